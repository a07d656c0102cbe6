"""rcomp.quant.fakequant: the fast fake quantization gives torch's outputs and gradients bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcomp.quant.fakequant import FastFakeQuantize, fake_quantize

RANGES = [(0, 255), (0, 127), (-128, 127), (-127, 127), (0, 15), (-8, 7), (-7, 7)]


def _inputs(seed: int, n: int, scale: float) -> torch.Tensor:
    """Random values over the whole range and beyond, a quarter of them exactly half-way between two levels
    (where rounding half to even and half away from zero differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale * 150
    k = torch.randint(-300, 300, (n // 4,), generator=g).float()
    x[: n // 4] = (k + 0.5) * scale
    return x


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.backward(torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape))
    return out.detach(), x.grad


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-5, 2.0), r=st.sampled_from(RANGES),
       zp_at=st.floats(0.0, 1.0))
def test_per_tensor_equals_torch(seed, scale, r, zp_at):
    qmin, qmax = r
    zp = int(round(qmin + zp_at * (qmax - qmin)))
    s = torch.tensor([scale], dtype=torch.float32)
    x = _inputs(seed, 4096, float(s))
    ref, gref = _grad(lambda t: torch.fake_quantize_per_tensor_affine(t, float(s), zp, qmin, qmax), x)
    out, g = _grad(lambda t: fake_quantize(t, s, torch.tensor([zp], dtype=torch.int32), qmin, qmax), x)
    assert torch.equal(out, ref)
    assert torch.equal(g, gref)
    with torch.no_grad():  # no mask kept, same values
        assert torch.equal(fake_quantize(x, s, torch.tensor([zp]), qmin, qmax), ref)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), axis=st.sampled_from([0, 1]), r=st.sampled_from(RANGES))
def test_per_channel_equals_torch(seed, axis, r):
    qmin, qmax = r
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, 3, 3, generator=g) * 0.3
    c = w.shape[axis]
    scale = (torch.rand(c, generator=g) * 0.05 + 1e-4).float()
    zp = torch.randint(qmin, qmax + 1, (c,), generator=g, dtype=torch.int32)
    halfway = (torch.randint(-40, 40, (c,), generator=g).float() + 0.5) * scale  # exact half-way points
    idx = [slice(None)] * 4
    idx[1 - axis] = 0
    w[tuple(idx)] = halfway.reshape(-1, 1, 1)
    ref, gref = _grad(lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp, axis, qmin, qmax), w)
    out, gout = _grad(lambda t: fake_quantize(t, scale, zp, qmin, qmax, axis=axis), w)
    assert torch.equal(out, ref)
    assert torch.equal(gout, gref)


def _pair(per_channel: bool):
    from torch.ao.quantization import FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver

    if per_channel:
        kw = dict(observer=PerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8,
                  qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        kw = dict(observer=MinMaxObserver, quant_min=0, quant_max=127, dtype=torch.quint8,
                  qscheme=torch.per_tensor_affine)
    return FakeQuantize(**kw), FastFakeQuantize(**kw)


@pytest.mark.parametrize("per_channel", [False, True])
def test_module_observes_and_rounds_as_torch(per_channel):
    """Observer on (training) then off (evaluation): the same scales, zero points, outputs and gradients."""
    ref, fast = _pair(per_channel)
    assert set(ref.state_dict()) == set(fast.state_dict())
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        x = torch.randn(8, 4, 5, 5, generator=g) * (step + 1)
        a, ga = _grad(ref, x)
        b, gb = _grad(fast, x)
        assert torch.equal(a, b) and torch.equal(ga, gb)
        for k, v in ref.state_dict().items():
            assert torch.equal(v, fast.state_dict()[k]), k
    ref.disable_observer()
    fast.disable_observer()
    x = torch.randn(8, 4, 5, 5, generator=g) * 9
    assert torch.equal(ref(x), fast(x))
    assert bool(fast.fake_quant_enabled[0]) and not bool(fast.observer_enabled[0])  # flags as they were


def test_module_falls_back_to_torch():
    """Not float32, or fake-quant off: torch's own forward (same results, float64 kept)."""
    ref, fast = _pair(False)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.equal(ref(x), fast(x))
    ref.disable_fake_quant()
    fast.disable_fake_quant()
    y = torch.randn(4, 3, 2, 2)
    assert torch.equal(fast(y), y) and torch.equal(ref(y), y)


def test_traced_graph_holds_torchs_op():
    """Under tracing the module is torch's FakeQuantize, so exported graphs keep the standard op."""
    _, fast = _pair(False)
    fast(torch.randn(4, 3, 2, 2))
    fast.disable_observer()
    traced = torch.jit.trace(fast, torch.randn(4, 3, 2, 2))
    assert "fake_quantize_per_tensor_affine" in str(traced.graph)


def test_nan_stays_nan():
    """The one intended difference: torch's op turns a NaN into the lowest level; this one keeps it NaN."""
    x = torch.tensor([0.1, float("nan"), -0.2])
    out = fake_quantize(x, torch.tensor([0.01]), torch.tensor([3]), 0, 255)
    assert torch.isnan(out[1]) and not torch.isnan(out[[0, 2]]).any()


def test_rcomp_twins_use_it():
    """rcomp's quantization builds its fake-quant twins from FastFakeQuantize."""
    from rcomp.quant import backend as qb

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 3))
    fq = qb.prepare(net, torch.rand(2, 1, 6, 6), 8, "x86", True)
    kinds = {type(m) for m in fq.modules() if type(m).__name__.endswith("FakeQuantize")}
    assert kinds == {FastFakeQuantize}


@pytest.mark.parametrize("axis", [None, 0])
def test_outputs_keep_the_inputs_strides(axis):
    """torch's op keeps its input's strides, and a convolution picks its memory format (so its rounding) by its
    weight's: a (C, 1, 3, 3) weight strided (9, 1, 3, 1) or (9, 9, 3, 1), a channels-last activation."""
    for x in (torch.randn(4, 9, 3, 3).transpose(0, 1).contiguous().transpose(0, 1)[:, :1].contiguous(),
              torch.randn(4, 3, 3, 1).permute(0, 3, 1, 2), torch.randn(2, 8, 8, 4).permute(0, 3, 1, 2)):
        x = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
        c = x.shape[0]
        s, z = torch.full((c,), 0.1), torch.zeros(c, dtype=torch.int32)
        ref = (torch.fake_quantize_per_channel_affine(x, s, z, 0, -127, 127) if axis == 0
               else torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -127, 127))
        out = fake_quantize(x, s if axis == 0 else s[:1], z if axis == 0 else z[:1], -127, 127, axis=axis)
        assert out.stride() == ref.stride() == x.stride()
        assert torch.equal(out, ref)
