"""rcomp prune: structured pruning round trips, CLI behaviour, errors, accuracy recovery."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcomp.models.loading import load, save
from rcomp.models.registry import build_model
from rcomp.pruning import prune

from conftest import assert_one_line_error, make_checkpoint, run_cli

# (arch, input shape, pruning options): every architecture the issue lists, at a small input size,
# spread over the importance criteria and options so each is exercised once.
ARCHS = [
    ("convnet8", (1, 8, 8), {"method": "l1"}),
    ("resnet18-cifar", (3, 8, 8), {"method": "l1", "scope": "global"}),
    ("resnet18", (3, 16, 16), {"method": "l2"}),
    ("resnet50", (3, 16, 16), {"method": "l1"}),
    ("mobilenet_v2", (3, 16, 16), {"method": "bn-scale"}),
    ("mobilenet_v3_small", (3, 16, 16), {"method": "random", "round_to": 8}),
    ("vgg11_bn", (3, 32, 32), {"method": "l1"}),
    ("efficientnet_b0", (3, 16, 16), {"method": "l1"}),
]


def _outputs(model, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, *shape, generator=g)
    with torch.no_grad():
        return model.eval()(x)


def _conv_linear_shapes(net):
    return {n: tuple(m.weight.shape) for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                        torch.nn.Linear))}


@pytest.mark.parametrize(("arch", "shape", "opts"), ARCHS, ids=[a[0] for a in ARCHS])
def test_round_trip_bit_identical(tmp_path, arch, shape, opts):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, input_shape=shape).eval()
    dense_params = model.num_parameters()
    model, rep = prune(model, 0.5, **opts)
    assert rep.params_after < 0.5 * dense_params
    assert rep.macs_after < rep.macs_before
    assert 0.3 <= rep.ratio_reached <= 0.7, rep
    path = tmp_path / "p.safetensors"
    save(model, path)
    again = load(path)
    assert _conv_linear_shapes(again.net) == _conv_linear_shapes(model.net)
    out, out2 = _outputs(model, shape), _outputs(again, shape)
    assert out.shape == (3, 10)
    assert torch.equal(out, out2)
    # depthwise convolutions stay depthwise after reload
    for m in again.net.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels
    assert again.meta.compression["pruning"]["method"] == opts["method"]
    assert again.meta.compression["structure"]


def test_prune_again_merges_summary(tmp_path):
    torch.manual_seed(0)
    model = build_model("convnet8", num_classes=10, input_shape=(1, 8, 8)).eval()
    dense = model.num_parameters()
    model, _ = prune(model, 0.5)
    save(model, tmp_path / "a.safetensors")
    model = load(tmp_path / "a.safetensors")
    model, rep = prune(model, 0.5, method="l2")
    save(model, tmp_path / "b.safetensors")
    again = load(tmp_path / "b.safetensors")
    assert torch.equal(_outputs(model, (1, 8, 8)), _outputs(again, (1, 8, 8)))
    summary = again.meta.compression["pruning"]
    assert summary["times"] == 2
    assert summary["params_before"] == dense
    assert summary["params_after"] == rep.params_after == again.num_parameters()
    assert summary["method"] == "l1+l2"
    assert abs(summary["ratio_reached"] - 0.75) < 0.02  # 50% of 50% left
    assert again.net.features[0].out_channels == 8


def test_ignore_keeps_layer_and_classifier(tmp_path):
    torch.manual_seed(0)
    model = build_model("convnet8", 10, (1, 8, 8)).eval()
    before = model.net.features[2].out_channels
    model, rep = prune(model, 0.5, ignore=["net.features.2"])
    assert model.net.features[2].out_channels == before
    assert model.net.features[0].out_channels < 32
    assert model.net.classifier[-1].out_features == 10
    assert rep.classifier == "classifier.3"
    assert rep.ignored == ["features.2"]


def test_target_macs_and_params_reached():
    torch.manual_seed(0)
    model = build_model("convnet8", 10, (1, 8, 8)).eval()
    _, rep = prune(model, target_macs=0.4)
    assert abs(rep.macs_after / rep.macs_before - 0.4) <= 0.005 or rep.macs_after / rep.macs_before < 0.4
    torch.manual_seed(0)
    model = build_model("convnet8", 10, (1, 8, 8)).eval()
    _, rep = prune(model, target_params=0.3, scope="global")
    assert abs(rep.params_after / rep.params_before - 0.3) <= 0.005 or rep.params_after / rep.params_before < 0.3


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ratio=st.floats(0.05, 0.9), seed=st.integers(0, 3))
def test_local_ratio_reached_and_classifier_untouched(ratio, seed):
    torch.manual_seed(seed)
    model = build_model("convnet8", 10, (1, 8, 8)).eval()
    model, rep = prune(model, ratio, method="random", seed=seed)
    # every layer keeps ceil-ish (1 - ratio) of its channels: the overall fraction is close to the request
    assert abs(rep.ratio_reached - ratio) < 0.05, (ratio, rep.ratio_reached)
    assert model.net.classifier[-1].out_features == 10
    assert rep.params_after <= rep.params_before
    assert _outputs(model, (1, 8, 8)).shape == (3, 10)


# ----------------------------------------------------------------------------- CLI


def test_cli_prune_info_and_chain(tmp_path, trained_digits):
    out = tmp_path / "p.safetensors"
    res = run_cli("prune", trained_digits, "--ratio", "0.5", "-o", out)
    assert res.code == 0, res.stderr
    assert res.stdout.strip() == str(out)
    assert "MACs" in res.stderr and "params" in res.stderr and "channels removed: 50.0%" in res.stderr
    res = run_cli("info", out, "--json")
    assert res.code == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["pruned"] and d["pruning"]["ratio_requested"] == 0.5
    assert d["layers"]["features.0"]["out_channels"] == 16
    hist = d["history"][-1]
    assert hist["command"] == "prune" and hist["params"]["method"] == "l1"
    assert hist["input_sha256"] == load(trained_digits).source_sha256
    assert hist["metrics"]["params_after"] < hist["metrics"]["params_before"]
    # an already pruned model prunes again, reading its path from stdin like a pipeline
    res = run_cli("prune", "--ratio", "0.5", "--method", "taylor", "--data", "digits", "--iterative", "2",
                  "--batches", "2", stdin=res.stdout and f"{out}\n")
    assert res.code == 0, res.stderr
    out2 = res.stdout.strip()
    assert out2.endswith("p.prune0.5.safetensors")
    again = load(out2)
    assert again.meta.compression["pruning"]["times"] == 2
    assert again.net.features[0].out_channels == 8
    assert [h["command"] for h in again.meta.history][-2:] == ["prune", "prune"]


def test_cli_refuses_existing_output(tmp_path, tiny_ckpt):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    res = run_cli("prune", tiny_ckpt, "--ratio", "0.5", "-o", out)
    assert res.code == 2 and out.read_bytes() == b"keep"


@pytest.mark.parametrize(("args", "needle"), [
    (["--ratio", "0"], "--ratio"),
    (["--ratio", "1"], "--ratio"),
    (["--ratio", "-0.5"], "--ratio"),
    (["--ratio", "half"], "not a number"),
    (["--target-macs", "1.5"], "--target-macs"),
    (["--ratio", "0.5", "--target-params", "0.5"], "exactly one"),
    ([], "exactly one"),
    (["--ratio", "0.5", "--ignore", "features.99"], "features.99"),
    (["--ratio", "0.5", "--method", "taylor"], "--data"),
    (["--ratio", "0.5", "--method", "magic"], "--method"),
    (["--ratio", "0.5", "--scope", "galaxy"], "--scope"),
    (["--ratio", "0.5", "--method", "bn-scale"], "batchnorm"),
    (["--ratio", "0.5", "--iterative", "0"], "--iterative"),
])
def test_cli_bad_input_one_line(tmp_path, tiny_ckpt, args, needle):
    out = tmp_path / "o.safetensors"
    res = run_cli("prune", tiny_ckpt, *args, "-o", out)
    assert_one_line_error(res, needle)
    assert not out.exists()


BADNET = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class FixedConv(nn.Module):
        """A convolution whose weight is a buffer, which torch-pruning cannot resize."""

        def __init__(self, cin, cout):
            super().__init__()
            self.register_buffer("kernel", torch.randn(cout, cin, 3, 3) * 0.1)

        def forward(self, x):
            return F.conv2d(x, self.kernel, padding=1)


    class BadNet(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.mix = FixedConv(16, 16)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = self.conv2(torch.relu(self.mix(torch.relu(self.conv1(x)))))
            return self.fc(x.mean((2, 3)))


    def badnet(num_classes=10):
        return BadNet(num_classes)
''')


def test_untraceable_layer_is_named(tmp_path, monkeypatch):
    (tmp_path / "rcomp_test_badnet.py").write_text(BADNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = "rcomp_test_badnet:badnet"
    ckpt = make_checkpoint(tmp_path / "bad.safetensors", arch, (3, 8, 8), trust_factory=True)
    res = run_cli("prune", ckpt, "--ratio", "0.5", "--arch", arch, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(res, "'mix'", "--ignore")
    # the fix the message gives works: keep the layer feeding it
    res = run_cli("prune", ckpt, "--ratio", "0.5", "--arch", arch, "--ignore", "conv1", "-o", tmp_path / "o.safetensors")
    assert res.code == 0, res.stderr
    pruned = load(tmp_path / "o.safetensors", factory=arch)
    assert pruned.net.conv1.out_channels == 16 and pruned.net.conv2.out_channels == 8


# ----------------------------------------------------------------------------- accuracy


def _accuracy(model, ds) -> float:
    from rcomp.data.registry import make_loader

    correct = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in make_loader(ds, 256):
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def test_prune_then_finetune_recovers_accuracy(tmp_path, trained_digits):
    import torch.nn.functional as F

    from rcomp.data.registry import get_dataset, make_loader

    model = load(trained_digits)
    test = get_dataset("digits", "test", model.meta.input)
    train = get_dataset("digits", "train", model.meta.input)
    dense_acc = _accuracy(model, test)
    res = run_cli("prune", trained_digits, "--ratio", "0.5", "-o", tmp_path / "p.safetensors")
    assert res.code == 0, res.stderr
    pruned = load(tmp_path / "p.safetensors")
    assert pruned.num_parameters() < 0.3 * model.num_parameters()
    pruned_acc = _accuracy(pruned, test)
    # the study's recipe: 3 epochs of SGD, lr 0.01, momentum 0.9
    torch.manual_seed(0)
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(3):
        pruned.train()
        for x, y in make_loader(train, 32, shuffle=True, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(pruned(x), y).backward()
            opt.step()
    pruned.eval()
    save(pruned, tmp_path / "ft.safetensors")
    tuned = load(tmp_path / "ft.safetensors")
    tuned_acc = _accuracy(tuned, test)
    assert tuned_acc == _accuracy(pruned, test)  # the reload changes nothing
    assert pruned_acc < dense_acc - 0.02, (dense_acc, pruned_acc)  # pruning half the channels did hurt
    assert tuned_acc > pruned_acc
    assert tuned_acc >= dense_acc - 0.02, (dense_acc, pruned_acc, tuned_acc)
    print(f"digits accuracy: dense {dense_acc:.3f}, pruned 50% {pruned_acc:.3f}, fine-tuned {tuned_acc:.3f}")
