"""How much faster is rcomp's fake quantization (rcomp.quant.fakequant) than torch's op, alone, in attacks on
quantized models and in their quantization-aware training?

Plain: torch's ``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine`` (what torch.ao's
``FakeQuantize`` calls); fast: :func:`rcomp.quant.fakequant.fake_quantize`, bit for bit the same. Interleaved
(A, B, A, B ...), one thread, median ratio and its spread; each round checks the results are identical.
Cases: the op on a 180x32x8x8 activation with its input gradient (the demo's first conv layer at auto's
batch); PGD-10 on 128 digits points against the demo's convnet8 as int8 (its fake-quant twin gives the
gradients) and as simulated int4, inside ``frozen_quantizers`` as ``evaluate`` runs it; and 12 steps of
quantization-aware training (forward, backward, SGD) of the int8 model at batch 128.

    python benchmarks/bench_fakequant.py           # 7 rounds
    python benchmarks/bench_fakequant.py --quick   # 3 rounds, 64 points
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_layout import _cpu  # noqa: E402
from benchmarks.common import ab_setup, digits_and_batch, interleaved, main, row, speed_rows  # noqa: E402


def _torch_op(x, scale, zero_point, quant_min, quant_max, axis=None):
    import torch

    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1).float(), zero_point.reshape(1).int(),
                                                     quant_min, quant_max)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point.int(), axis, quant_min, quant_max)


@contextlib.contextmanager
def _plain():
    """rcomp's fake-quant code calling torch's op instead of its own."""
    import rcomp.quant.fakequant as fq
    import rcomp.quant.frozen as frozen

    saved = fq.fake_quantize, frozen.fake_quantize
    fq.fake_quantize = frozen.fake_quantize = _torch_op
    try:
        yield
    finally:
        fq.fake_quantize, frozen.fake_quantize = saved


def _ab(fn, rounds: int, same):
    def plain():
        with _plain():
            return fn()
    return interleaved(plain, fn, rounds, same)


def _op(rounds: int):
    import torch


    x = (torch.randn(180, 32, 8, 8, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_(True)
    s, z = torch.tensor([0.02]), torch.tensor([7], dtype=torch.int32)

    def go():
        import rcomp.quant.fakequant as fq

        x.grad = None
        fq.fake_quantize(x, s, z, 0, 127).sum().backward()
        return x.grad.clone()
    return _ab(go, rounds * 5, torch.equal)


def _attack(model, x, y, rounds: int):
    import torch

    from rcomp.attacks import make_attack
    from rcomp.quant.frozen import frozen_quantizers

    attack = make_attack("pgd", eps=0.1, steps=10, seed=0)

    def go():
        attack.reset()
        with frozen_quantizers(model, model.gradient_model()):
            return attack(model, x, y)
    return _ab(go, rounds, torch.equal)


def _training(model, x, y, rounds: int):
    import copy

    import torch
    import torch.nn.functional as F

    from rcomp.quant.qat import to_trainable

    start = to_trainable(model)

    def go():
        net = copy.deepcopy(start).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(12):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])
    return _ab(go, rounds, torch.equal)


def run(quick: bool = False) -> list[dict]:
    import torch

    from rcomp.quant.ptq import quantize

    rounds, n, cmd = ab_setup("bench_fakequant.py", quick)
    digits, x, y = digits_and_batch(n)
    int8 = quantize(digits, [x], bits=8, backend="x86")  # torch.ao, as when its figures were recorded
    int4 = quantize(digits, [x], bits=4, simulate=True)
    label = "torch's op / rcomp's"
    rows = [row("CPU, threads", f"{_cpu()}, {torch.get_num_threads()}", command=cmd)]
    rows += speed_rows(f"fake-quant of a 180x32x8x8 activation, forward + input gradient ({rounds * 5} rounds)",
                       label, _op(rounds), "identical gradients", cmd)
    for name, model in (("int8 (fake-quant twin)", int8), ("simulated int4", int4)):
        rows += speed_rows(f"convnet8 digits {name}, PGD-10 on {len(y)} points ({rounds} rounds)", label,
                           _attack(model, x, y, rounds), "identical adversarial examples", cmd)
    rows += speed_rows(f"convnet8 digits int8, 12 quantization-aware training steps at batch {len(y)} "
                       f"({rounds} rounds)", label, _training(int8, x, y, rounds), "identical weights", cmd)
    return rows


if __name__ == "__main__":
    main(run)
