"""Fake quantization as a few vectorised tensor ops: torch's results, bit for bit, several times faster.

torch's ``fake_quantize_per_tensor_affine`` and ``fake_quantize_per_channel_affine`` run an element-wise
kernel that CPUs do not vectorise well: on a 2-core AMD EPYC (AVX2), 1 thread, a 180x32x8x8 activation
takes 5.4 ms with the input gradient wanted, 15 ns an element, as long as the convolution before it (the
int8 twin's profile under ``auto``: 10.7 s of fake-quant beside 10.8 s of conv2d). :func:`fake_quantize`
computes the same thing, ``(clamp(round(x * (1 / scale)), qmin - zp, qmax - zp)) * scale`` in float32
with rounding half to even (the kernel's ``nearbyint``), and its gradient is the kernel's: the incoming
gradient where the rounded value lay inside ``[qmin, qmax]``, zero elsewhere. Same shape: 1.1 ms with
the gradient, 0.26 ms without (``python benchmarks/bench_frozen_quant.py`` measures the effect on attacks).

:class:`FastFakeQuantize` is torch.ao's ``FakeQuantize`` with that forward pass: rcomp's quantization
config (:mod:`rcomp.quant.backend`) builds every fake-quant twin with it, so training, attacks and
evaluation of int8 and simulated low-bit models use it. Its buffers, observers and state dict are
``FakeQuantize``'s; it falls back to torch's op where the fast path does not apply (not float32, a
float zero point, tracing and exporting). One difference, on purpose: torch's op maps a NaN input to the
lowest level, this one keeps it NaN, so training's non-finite guards see it. tests/test_fakequant.py
compares outputs, gradients and observer state with torch's on random and half-way inputs.
"""

from __future__ import annotations

import torch
from torch.ao.quantization.fake_quantize import FakeQuantize


class _FakeQuant(torch.autograd.Function):
    """``clamp(round(x * inv), lo, hi) * scale``; the gradient passes where the rounded value is in range."""

    @staticmethod
    def forward(ctx, x, scale, inv, lo, hi):  # noqa: D102 - see the class
        r = x * inv
        r.round_()
        out = torch.clamp(r, lo, hi)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(out == r)  # in range; a NaN is not (as torch's mask)
        return out.mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                  axis: int | None = None) -> torch.Tensor:
    """torch's ``fake_quantize_per_tensor_affine`` (``axis`` None; ``scale`` and ``zero_point`` of one
    element) or ``fake_quantize_per_channel_affine`` (along ``axis``) of a float32 ``x``, bit for bit,
    NaN aside (see the module doc). ``scale`` float, ``zero_point`` integer tensors."""
    scale = scale.to(device=x.device, dtype=torch.float32)
    zp = zero_point.to(device=x.device, dtype=torch.float32)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
    inv = torch.reciprocal(scale)
    return _FakeQuant.apply(x, scale, inv, quant_min - zp, quant_max - zp)


def _tracing() -> bool:
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


class FastFakeQuantize(FakeQuantize):
    """torch.ao's ``FakeQuantize`` whose rounding is :func:`fake_quantize` (module doc)."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if (_tracing() or X.dtype != torch.float32 or not bool(self.fake_quant_enabled[0])
                or self.zero_point.is_floating_point()):
            return super().forward(X)
        if bool(self.observer_enabled[0]):  # torch's own update of scale and zero point, without its rounding
            self.fake_quant_enabled[0] = 0
            try:
                super().forward(X)
            finally:
                self.fake_quant_enabled[0] = 1
        axis = self.ch_axis if self.is_per_channel else None
        return fake_quantize(X, self.scale, self.zero_point, self.activation_post_process.quant_min,
                             self.activation_post_process.quant_max, axis)
