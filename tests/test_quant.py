"""Quantization: real int8 and simulated bits, pickle-free round trips, surrogate gradients, QAT hooks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcomp.models.loading import load, save
from rcomp.models.registry import build_model
from rcomp.quant import qat
from rcomp.quant.ptq import quantize

from conftest import assert_one_line_error, make_checkpoint


def _quantize_roundtrip(model, x, tmp_path, bits, simulate, tag, calib_n=8, backend=None):
    qm = quantize(model, [x[:calib_n]], bits=bits, simulate=simulate, backend=backend)
    import uuid

    path = tmp_path / f"{tag}-{uuid.uuid4().hex[:8]}.safetensors"
    save(qm, path)
    back = load(path)
    with torch.no_grad():
        a, b = qm(x), back(x)
    return qm, back, a, b, path


def _pruned_convnet8():
    import torch_pruning as tp

    torch.manual_seed(1)
    model = build_model("convnet8", 10, (1, 8, 8)).eval()
    net = model.net
    pruner = tp.pruner.BasePruner(net, torch.rand(1, 1, 8, 8), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[net.classifier[-1]])
    pruner.step()
    return model


# small widths keep the full graphs (residual adds, depthwise convolutions) but make the test fast
CASES = [("convnet8", (1, 8, 8), {}), ("resnet18-cifar", (3, 16, 16), {"width": 8}),
         ("mobilenet_v2", (3, 32, 32), {"width_mult": 0.25}), ("pruned", None, {})]


@pytest.mark.parametrize("arch,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_save_load_identical_outputs(arch, shape, kwargs, tmp_path):
    torch.manual_seed(0)
    if arch == "pruned":
        model, shape = _pruned_convnet8(), (1, 8, 8)
        assert model.net.features[0].out_channels < 32
    else:
        model = build_model(arch, 10, shape, kwargs=kwargs).eval()
    x = torch.rand(12, *shape)
    for bits, simulate, backend in ((8, False, None), (8, False, "x86"), (4, True, None)):
        qm, back, a, b, path = _quantize_roundtrip(model, x, tmp_path, bits, simulate, f"{arch}{bits}", backend=backend)
        assert torch.equal(a, b), (arch, bits, (a - b).abs().max())
        q = back.meta.compression["quantization"]
        assert (q["mode"], q["bits"]) == (("simulated", 4) if simulate else ("int8", 8))
        if arch == "pruned":
            assert back.meta.compression.get("structure"), "pruned structure lost"
        if simulate:
            assert back.gradient_source == "straight-through (fake-quant rounding)"
        else:
            assert back.gradient_source == "fake-quant twin of int8"
            # real int8 kernels: pt2e (the default: oneDNN's int8 convolutions and linears) or torch.ao's modules
            # holding quantized weights; no autograd through the int8 forward pass
            from rcomp.quant.pt2e import Pt2eInt8, fused_ops

            assert q["backend"] == (backend or "pt2e")
            if backend is None:
                assert isinstance(back.net, Pt2eInt8)
                assert {"onednn.qconv_pointwise.default", "onednn.qlinear_pointwise.default"} & set(fused_ops(back.net))
            else:
                assert any(getattr(m, "weight", None) is not None and callable(m.weight) and m.weight().is_quantized
                           for m in back.net.modules() if hasattr(m, "_packed_params"))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:  # plain tensors only; weights stored as integers
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".weight_q")}
        assert dtypes == {"I8"}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bits=st.integers(2, 16), seed=st.integers(0, 1000))
def test_simulated_bits_roundtrip_and_error_shrinks(bits, seed, tmp_path):
    torch.manual_seed(seed)
    model = build_model("mlp", 10, (1, 8, 8)).eval()
    x = torch.rand(16, 1, 8, 8)
    qm, back, a, b, _ = _quantize_roundtrip(model, x, tmp_path, bits, True, f"mlp{bits}", calib_n=16)
    assert torch.equal(a, b)
    with torch.no_grad():
        ref = model(x)
    err = (a - ref).abs().max().item()
    # on calibrated inputs (no clipping) the rounding error of a b-bit model shrinks like 2^-b
    assert err <= 20 * 2.0 ** (-bits) * ref.abs().max().item() + 1e-5


def _pgd(model, x, y, eps, steps=10):
    alpha = eps / 4
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        (g,) = torch.autograd.grad(loss, xa)
        xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return xa.detach()


def _digits_test(model, n=240):
    from rcomp.data.registry import get_dataset, make_loader

    ds = get_dataset("digits", "test", model.meta.input)
    x, y = next(iter(make_loader(ds, n, n=n)))
    return x, y


def _calib(model, n=128):
    from rcomp.data.registry import get_dataset, make_loader

    ds = get_dataset("digits", "train", model.meta.input)
    return [x for x, _ in make_loader(ds, 64, shuffle=True, seed=0, n=n)]


@pytest.fixture(scope="module")
def int8_digits(trained_digits):
    model = load(trained_digits)
    return model, quantize(model, _calib(model))


def test_surrogate_examples_beat_random_noise(int8_digits):
    _, qm = int8_digits
    x, y = _digits_test(qm)
    x_in = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError):  # real int8 kernels have no autograd
        F.cross_entropy(qm(x_in), y).backward()
    eps = 0.2
    with torch.no_grad():
        clean = (qm(x).argmax(1) == y)
    adv = _pgd(qm.gradient_model(), x, y, eps)
    noise = (x + eps * torch.randint(0, 2, x.shape).float().mul(2).sub(1)).clamp(0, 1)
    with torch.no_grad():
        acc_adv = ((qm(adv).argmax(1) == y) & clean).float().mean().item()
        acc_noise = ((qm(noise).argmax(1) == y) & clean).float().mean().item()
    assert clean.float().mean().item() > 0.85
    assert (adv - x).abs().max().item() <= eps + 1e-6
    assert acc_adv < acc_noise - 0.4, (acc_adv, acc_noise)


def test_surrogate_tracks_int8_model(int8_digits):
    _, qm = int8_digits
    x, _ = _digits_test(qm, 64)
    with torch.no_grad():
        real, twin = qm(x), qm.gradient_model()(x)
    agree = (real.argmax(1) == twin.argmax(1)).float().mean().item()
    assert agree > 0.95
    assert (real - twin).abs().max().item() < 0.5 * real.abs().max().item()


@pytest.mark.parametrize("mode", ["int8", "sim4"])
def test_qat_trains_and_writes_same_format(mode, int8_digits, tmp_path):
    model, q8 = int8_digits
    qm = q8 if mode == "int8" else quantize(model, _calib(model), bits=4, simulate=True)
    x, y = _digits_test(qm)
    trainable = qat.to_trainable(qm)
    with torch.no_grad():
        start, ref = trainable(x), qm(x)
    if mode == "sim4":
        assert torch.equal(start, ref)  # the trainable copy starts from the quantized values exactly
    else:
        assert (start.argmax(1) == ref.argmax(1)).float().mean().item() > 0.95
    before = {k: v.clone() for k, v in trainable.state_dict().items()}
    from rcomp.data.registry import get_dataset, make_loader

    train = get_dataset("digits", "train", qm.meta.input)
    opt = torch.optim.SGD([p for p in trainable.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    trainable.train()
    for xb, yb in make_loader(train, 64, shuffle=True, seed=0, n=320):
        opt.zero_grad()
        F.cross_entropy(trainable(xb), yb).backward()
        opt.step()
    trainable.eval()
    assert any(not torch.equal(before[k], v) for k, v in trainable.state_dict().items() if k.endswith("weight"))
    tuned = qat.from_trainable(trainable, qm)
    assert tuned.meta.compression["quantization"] == qm.meta.compression["quantization"]
    assert tuned.gradient_source == qm.gradient_source
    path = tmp_path / f"qat_{mode}.safetensors"
    save(tuned, path)
    back = load(path)
    with torch.no_grad():
        out, out_back = tuned(x), back(x)
        acc_before = (qm(x).argmax(1) == y).float().mean().item()
        acc_after = (out.argmax(1) == y).float().mean().item()
    assert torch.equal(out, out_back)
    assert acc_after >= acc_before - 0.05


def test_cli_int8_smaller_same_accuracy(cli, trained_digits, tmp_path):
    out = tmp_path / "q.safetensors"
    res = cli("quantize", trained_digits, "--data", "digits", "--calib-n", "128", "-o", out, "--json")
    assert res.code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["path"] == str(out) and out.is_file()
    assert rep["size_bytes"] <= 0.3 * rep["input_size_bytes"]
    assert abs(rep["accuracy"] - rep["accuracy_float"]) <= 0.02
    info = cli("info", out, "--json")
    q = json.loads(info.stdout)["quantization"]
    assert (q["mode"], q["bits"], q["backend"]) == ("int8", 8, "pt2e")  # the default runtime
    assert "per-channel" in q["weight_scheme"] and "per-tensor" in q["activation_scheme"]
    hist = json.loads(info.stdout)["history"][-1]
    assert hist["command"] == "quantize" and hist["input_sha256"]
    # stdout is only the path; chaining through stdin works; a quantized input is refused
    res2 = cli("quantize", "--simulate", "--bits", "4", "--eval-n", "0", "--calib-n", "32", stdin=f"{trained_digits}\n")
    assert res2.code == 0, res2.stderr
    assert res2.stdout.strip().endswith(".sim4.safetensors") and len(res2.stdout.strip().splitlines()) == 1
    assert_one_line_error(cli("quantize", out, "-o", tmp_path / "again.safetensors"), "already quantized")
    assert_one_line_error(cli("quantize", trained_digits, "-o", out), "exists")


@pytest.mark.parametrize("bits,simulate", [("0", False), ("1", False), ("32", False), ("x", False), ("1", True),
                                           ("17", True)])
def test_cli_bad_bits(cli, tiny_ckpt, bits, simulate):
    args = ["quantize", tiny_ckpt, "--bits", bits] + (["--simulate"] if simulate else [])
    assert_one_line_error(cli(*args), "supported", "--bits 8", "2..16")


def test_cli_bad_backend(cli, tiny_ckpt):
    assert_one_line_error(cli("quantize", tiny_ckpt, "--backend", "tensorrt"), "x86, fbgemm, qnnpack")


def test_cli_qnnpack_roundtrip(cli, tmp_path):
    src = make_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "m.qnn.safetensors"
    res = cli("quantize", src, "--backend", "qnnpack", "--data", "digits", "--calib-n", "32", "--eval-n", "0", "-o", out)
    assert res.code == 0, res.stderr
    try:
        back = load(out)
        x = torch.rand(4, 1, 8, 8)
        assert back.meta.compression["quantization"]["backend"] == "qnnpack"
        assert torch.equal(back(x), load(out)(x))
    finally:
        torch.backends.quantized.engine = "x86"


def test_a_network_fx_cannot_trace_is_refused_before_the_calibration_data_loads(tmp_path, monkeypatch):
    """As timm's mobilevit_xxs (control flow on tensor values): refused from the model, no data read."""
    import torch.nn as nn

    import rcomp
    import rcomp.data.registry as registry

    class Branchy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) if x.sum() > 0 else -self.inner(x)

    model = rcomp.load(make_checkpoint(tmp_path / "m.safetensors", dataset="digits"))
    model.net = Branchy(model.net)
    reads = []
    monkeypatch.setattr(registry, "get_dataset", lambda *a, **kw: reads.append(a) or 1 / 0)
    for simulate in (False, True):
        with pytest.raises(rcomp.RcompError, match="cannot trace this network with torch.fx"):
            rcomp.quantize(model, simulate=simulate, bits=4 if simulate else 8, log=lambda _m: None)
    assert reads == []


def test_loading_a_quantized_checkpoint_records_no_stack_traces(int8_digits, tmp_path):
    """torch.ao's tracer would record a stack trace per node, whose first symbolisation imports torch._dynamo
    (3.3 s, once per process); rcomp turns that off while it prepares a twin, and puts torch's flag back."""
    import subprocess
    import sys

    import torch.fx.config as fx_config

    path = tmp_path / "int8.safetensors"
    save(int8_digits[1], path)
    code = ("import sys, torch.fx.config as c; from rcomp.models.loading import load; m = load(sys.argv[1]); "
            "m(m.example_input() if hasattr(m, 'example_input') else __import__('torch').rand(2, 1, 8, 8)); "
            "print('torch._dynamo' in sys.modules, c.do_not_emit_stack_traces)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["False", "False"], out.stdout
    assert fx_config.do_not_emit_stack_traces is False
