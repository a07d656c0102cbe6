"""Fake quantization as a few vectorised tensor ops: torch's results, bit for bit, several times faster.

torch's ``fake_quantize_per_tensor_affine`` and ``fake_quantize_per_channel_affine`` run an element-wise
kernel that CPUs do not vectorise well: on a 2-core AMD EPYC (AVX2), 1 thread, a 180x32x8x8 activation
takes 5.4 ms with the input gradient wanted, 15 ns an element, as long as the convolution before it (the
int8 twin's profile under ``auto``: 10.7 s of fake-quant beside 10.8 s of conv2d). :func:`fake_quantize`
computes the same thing, ``(clamp(round(x * (1 / scale)), qmin - zp, qmax - zp)) * scale`` in float32
with rounding half to even (the kernel's ``nearbyint``), and its gradient is the kernel's: the incoming
gradient where the rounded value lay inside ``[qmin, qmax]``, zero elsewhere. Same shape: 0.45 ms with
the gradient, 0.15 ms without (``python benchmarks/bench_fakequant.py``: the op, attacks and training).

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
    """``clamp(round(x * inv), lo, hi) * scale``; the gradient passes where the rounded value is in range.
    ``inv``, ``scale``, ``lo``, ``hi``: Python floats (one scale) or tensors that broadcast (per channel).
    The mask is kept as float 1/0 and made without bool tensors: torch's bool kernels are 10-40x slower
    than its float ones on this kind of CPU (``grad * bool_mask`` 2.7 ms, ``grad * float_mask`` 0.07 ms)."""

    @staticmethod
    def forward(ctx, x, scale, inv, lo, hi):  # noqa: D102 - see the class
        # every tensor keeps x's strides, as torch's op does (a weight of shape (C, 1, 3, 3) has two stride
        # layouts, and the convolution after it picks its memory format, hence its rounding, by them)
        r = torch.empty_like(x, memory_format=torch.preserve_format)
        torch.mul(x, inv, out=r)
        r.round_()
        out = torch.empty_like(r, memory_format=torch.preserve_format) if ctx.needs_input_grad[0] else r
        if isinstance(lo, float):
            torch.clamp(r, lo, hi, out=out)
        else:
            torch.maximum(torch.minimum(r, hi, out=out), lo, out=out)
        if ctx.needs_input_grad[0]:  # 1 where r was in range (r - out is 0), 0 where clamped (|r - out| >= 1)
            ctx.save_for_backward(r.sub_(out).abs_().clamp_(max=1.0).neg_().add_(1.0))
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
    scale = scale.detach().to(device=x.device, dtype=torch.float32)
    inv = torch.reciprocal(scale)  # float32 1/scale, as the kernel computes it
    if axis is None:  # Python floats: exact (float32 values), and torch's scalar kernels are the fast ones
        zp = float(zero_point.reshape(()))
        return _FakeQuant.apply(x, float(scale.reshape(())), float(inv.reshape(())), quant_min - zp, quant_max - zp)
    shape = [1] * x.dim()
    shape[axis] = -1
    zp = zero_point.detach().to(device=x.device, dtype=torch.float32).reshape(shape)
    if not bool(zp.any()):  # symmetric weights: bounds are numbers
        return _FakeQuant.apply(x, scale.reshape(shape), inv.reshape(shape), float(quant_min), float(quant_max))
    return _FakeQuant.apply(x, scale.reshape(shape), inv.reshape(shape), quant_min - zp, quant_max - zp)


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
