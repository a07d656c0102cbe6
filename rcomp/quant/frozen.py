"""A frozen fake-quant network while it is only evaluated: each weight rounded once, not on every call.

A fake-quant twin (an int8 model's gradient surrogate, a simulated low-bit model's network) recomputes
``weight_fake_quant(weight)`` on every forward pass, and torch.ao's ``FakeQuantize`` modules spend Python
time on every call. While rcomp evaluates a model (``rcomp.evaluation.robustness.evaluate``: attacks,
bench, training's validation) no weight changes, so inside :func:`frozen_quantizers`

* each weight quantizer whose observer is off is replaced by its output, computed once;
* each per-tensor activation ``FakeQuantize`` whose observer is off calls the rounding
  (:func:`rcomp.quant.fakequant.fake_quantize`, torch's op bit for bit) directly with its scale and zero point,

and the modules are put back after. Outputs and input gradients are bit-identical (the same ops on the
same values; tests/test_frozen_quant.py). On a digits convnet8 (``python benchmarks/bench_frozen_quant.py``,
AMD EPYC AVX2, 1 thread, median of 7): PGD-10 1.13x (int8) / 1.23x (simulated int4) faster, APGD-T with 3
restarts 1.38x / 1.39x (it runs ever smaller batches as points fall, where per-call overhead weighs more).
Quantizers still observing (calibration, quantization-aware training in train mode) are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rcomp.quant.fakequant import FastFakeQuantize, fake_quantize


class _StandIn(nn.Module):
    """Takes a frozen quantizer's place; anything else asked of it (``observer_enabled``, ``scale``...) is the
    original's, so code that flips its flags inside the block (``Trainable.train``, ``eval_mode``) still works,
    and once the original is not frozen any more the original computes."""

    def __init__(self, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: named_modules stays the network's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _frozen(self._original):
            return self._original(x)
        return self.frozen_forward(x)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Rounded(_StandIn):
    """Stands in for a weight quantizer: returns the weight it rounded once."""

    def __init__(self, original: nn.Module, value: torch.Tensor):
        super().__init__(original)
        self.value = value

    def frozen_forward(self, _weight: torch.Tensor) -> torch.Tensor:
        return self.value


class _PerTensor(_StandIn):
    """Stands in for a per-tensor activation ``FakeQuantize``: the same op, without the module's bookkeeping."""

    def __init__(self, fq: nn.Module):
        super().__init__(fq)
        self.qparams = (fq.scale.detach().clone(), fq.zero_point.detach().clone(), int(fq.quant_min),
                        int(fq.quant_max))

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # the original's own fallback to torch's op
            return self._original(x)
        return fake_quantize(x, *self.qparams)


def _frozen(fq: nn.Module) -> bool:
    """A torch.ao fake-quant module that rounds and no longer observes."""
    on = getattr(fq, "fake_quant_enabled", None)
    obs = getattr(fq, "observer_enabled", None)
    return isinstance(on, torch.Tensor) and isinstance(obs, torch.Tensor) and bool(on[0]) and not bool(obs[0])


@contextlib.contextmanager
def frozen_quantizers(*modules: nn.Module | None) -> Iterator[None]:
    """Inside the block, the frozen quantizers of ``modules`` (see the module doc) compute once; after it, every
    module replaced is back in its place, also after an exception."""
    from torch.ao.quantization.fake_quantize import FakeQuantize, FakeQuantizeBase

    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    seen: set[int] = set()
    try:
        for root in (m for m in modules if isinstance(m, nn.Module)):
            for parent in list(root.modules()):
                if id(parent) in seen:
                    continue
                seen.add(id(parent))
                for name, child in list(parent._modules.items()):
                    if not isinstance(child, FakeQuantizeBase) or not _frozen(child):
                        continue
                    weight = getattr(parent, "weight", None) if name == "weight_fake_quant" else None
                    if isinstance(weight, torch.Tensor):
                        with torch.no_grad():
                            stand_in: nn.Module = _Rounded(child, child(weight).detach())
                    elif type(child) in (FakeQuantize, FastFakeQuantize) and child.qscheme in (torch.per_tensor_affine,
                                                                           torch.per_tensor_symmetric) \
                            and child.scale.numel() == 1:
                        stand_in = _PerTensor(child)
                    else:
                        continue
                    swaps.append((parent, name, child))
                    parent._modules[name] = stand_in
        yield
    finally:
        for parent, name, child in reversed(swaps):
            parent._modules[name] = child
