"""Memory layout of a model's weights while rcomp evaluates it.

On CPU, oneDNN's convolutions run faster on channels-last (NHWC) weights: PGD-10 on resnet18-cifar
(3x32x32) ran 1.25x faster (``python benchmarks/bench_layout.py``, AMD EPYC AVX2, 1 thread); on the
demo's convnet8 at 1x8x8 it makes no measurable difference. :func:`fast_layout` switches a model's 4-D
floating-point weights to channels-last for the duration of a block and puts every tensor it changed
back on its own storage afterwards, so a caller's model comes out as it went in (same storage, same
strides: ``safetensors`` refuses a non-contiguous tensor). The layout changes no value, only how the
arithmetic is ordered: figures may move by float rounding, as between two CPUs.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator

import torch
from torch import nn


def _tensors(modules) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                yield t


@contextlib.contextmanager
def fast_layout(*modules: nn.Module | None, device: str = "cpu", probe: Callable[[], object] | None = None
                ) -> Iterator[None]:
    """Channels-last 4-D float weights of ``modules`` (e.g. a model and its gradient surrogate) inside the
    block, on CPU only; every tensor changed is put back on its own storage after. Elsewhere, a no-op.
    ``probe`` (e.g. a forward pass on two images) is first run in the new layout, and if it raises (a network
    that calls ``.view`` on its activations needs them contiguous) nothing is changed."""
    if torch.device(device).type != "cpu":
        yield
        return
    changed = []
    for t in _tensors([m for m in modules if isinstance(m, nn.Module)]):
        if t.dim() == 4 and t.is_floating_point() and t.device.type == "cpu" and t.is_contiguous():
            # restrided explicitly: a tensor with one input channel counts as contiguous in both layouts, and
            # torch then keeps that convolution, and every one after it, in NCHW
            cl = torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
            if cl.stride() != t.stride():
                changed.append((t, t.data))
                t.data = cl
    if changed and probe is not None:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints a traced forward's failure itself
                probe()
        except Exception:  # noqa: BLE001 - any failure in the new layout means: keep the old one
            _restore(changed)
            changed = []
    try:
        yield
    finally:
        _restore(changed)


def _restore(changed: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each tensor back on its own storage (shared storage stays shared), with whatever it holds now."""
    for t, own in changed:
        own.copy_(t.data)
        t.data = own
