"""How much faster do attacks on quantized models run with their fake-quant rounded once (``evaluate`` now does)?

While rcomp evaluates a model, :func:`rcomp.quant.frozen.frozen_quantizers` replaces each frozen weight
quantizer of a fake-quant network (an int8 model's gradient surrogate, a simulated low-bit model) by its
output, computed once, and each per-tensor activation ``FakeQuantize`` by the bare op. This script times
the same attack on the same batch with and without, interleaved (A, B, A, B ...), reports the median
ratio and its spread, and checks that the adversarial examples are identical. Models: convnet8 trained
3 epochs on digits (the demo's architecture), quantized to real int8 and to simulated int4. One thread
(two-thread torch on a shared machine is skewed by OpenMP busy-waiting, docs/benchmarks.md).

    python benchmarks/bench_frozen_quant.py           # PGD-10 and APGD-T (3 restarts) on 128 points, 7 rounds
    python benchmarks/bench_frozen_quant.py --quick   # 3 rounds, 64 points, shorter APGD-T
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_layout import _cpu  # noqa: E402
from benchmarks.common import ab_setup, digits_and_batch, main, row, speed_rows  # noqa: E402


def _timing(model, attack, x, y, rounds: int):
    import torch

    from benchmarks.common import interleaved
    from rcomp.quant.frozen import frozen_quantizers

    def call(once: bool):
        def go():
            if hasattr(attack, "reset"):  # the same random start in both (PGD draws per call)
                attack.reset()
            with frozen_quantizers(model, model.gradient_model()) if once else torch.enable_grad():
                return attack(model, x, y)
        return go

    return interleaved(call(False), call(True), rounds, torch.equal)


def run(quick: bool = False) -> list[dict]:
    import torch

    from rcomp.attacks import make_attack
    from rcomp.quant.ptq import quantize

    rounds, n, cmd = ab_setup("bench_frozen_quant.py", quick)
    digits, x, y = digits_and_batch(n)
    cases = [("convnet8 digits int8 (fake-quant twin)", quantize(digits, [x], bits=8, backend="x86")),
             ("convnet8 digits simulated int4", quantize(digits, [x], bits=4, simulate=True))]
    rows = [row("CPU, threads", f"{_cpu()}, {torch.get_num_threads()}", command=cmd)]
    for name, model in cases:
        for aname, attack in [("pgd-10", make_attack("pgd", eps=0.1, steps=10, seed=0)),
                              ("apgd-t x3", make_attack("apgd-t", eps=0.1, steps=20 if quick else 50, restarts=3,
                                                        seed=0))]:
            rows += speed_rows(f"{name}, {aname} on {len(y)} points ({rounds} rounds)", "plain / rounded once",
                               _timing(model, attack, x, y, rounds), "identical adversarial examples", cmd)
    return rows


if __name__ == "__main__":
    main(run)
