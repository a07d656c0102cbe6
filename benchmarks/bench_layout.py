"""How much faster do attacks run with channels-last weights (what ``evaluate`` now does on CPU)?

rcomp's evaluation loop switches a model's 4-D weights to channels-last while it attacks
(:func:`rcomp.models.layout.fast_layout`) and puts them back after. This script times the same
attack on the same batch with and without, interleaved (A, B, A, B ...), and reports the median
ratio and its spread, and checks that the adversarial accuracy is the same. Models: convnet8
trained 3 epochs on digits (1x8x8, the demo's architecture), its fake-quant int8 twin, and
resnet18-cifar with random weights (3x32x32; time does not depend on the weights). One thread:
two-thread torch on a shared machine is skewed by OpenMP busy-waiting (docs/benchmarks.md).

    python benchmarks/bench_layout.py           # PGD-10 on 128 points, 7 rounds; APGD-T on convnet8
    python benchmarks/bench_layout.py --quick   # 3 rounds, smaller batches
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ab_setup, digits_and_batch, main, row, speed_rows  # noqa: E402


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timing(model, attack, x, y, rounds: int):
    import torch

    from benchmarks.common import interleaved
    from rcomp.models.layout import fast_layout

    grad = model.gradient_model() if hasattr(model, "gradient_model") else model

    def call(layout: bool):
        def go():
            if hasattr(attack, "reset"):
                attack.reset()
            with fast_layout(model, grad) if layout else torch.enable_grad():
                adv = attack(model, x, y)
            with torch.no_grad():
                return (model(adv).argmax(1) == y).float().mean().item()
        return go

    return interleaved(call(False), call(True), rounds, lambda a, b: a == b)


def run(quick: bool = False) -> list[dict]:
    import torch

    from rcomp.attacks import make_attack
    from rcomp.models.registry import build_model
    from rcomp.quant.ptq import quantize

    rounds, n, cmd = ab_setup("bench_layout.py", quick)
    digits, x, y = digits_and_batch(n)
    int8 = quantize(digits, [x], bits=8, backend="x86")  # torch.ao, as when its figures were recorded
    torch.manual_seed(0)
    resnet = build_model("resnet18-cifar", 10, (3, 32, 32)).eval()
    xr, yr = torch.rand(n // 4, 3, 32, 32), torch.randint(0, 10, (n // 4,))
    cases = [("convnet8 digits", digits, x, y), ("convnet8 digits int8 (fake-quant twin)", int8, x, y),
             ("resnet18-cifar (random weights)", resnet, xr, yr)]
    rows = [row("CPU, threads", f"{_cpu()}, {torch.get_num_threads()}", command=cmd)]
    for name, model, xs, ys in cases:
        attacks = [("pgd-10", make_attack("pgd", eps=0.1, steps=10, seed=0))]
        if model is digits:
            attacks.append(("apgd-t", make_attack("apgd-t", eps=0.1, steps=20 if quick else 50, seed=0)))
        for aname, attack in attacks:
            rows += speed_rows(f"{name}, {aname} on {len(ys)} points ({rounds} rounds)", "plain / channels-last",
                               _timing(model, attack, xs, ys, rounds), "same adversarial accuracy", cmd)
    return rows


if __name__ == "__main__":
    main(run)
