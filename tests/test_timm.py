"""timm as an optional architecture source (``--arch timm:NAME``, the ``rcomp[timm]`` extra).

Four timm models at 3x32x32 with 10 classes (digits is resized to RGB 32x32 by the data layer):
build, save and reload without pickle; prune 0.5 and reload to identical outputs; quantize (int8,
sim4); attack with ``auto`` and bench a pruned one; convert timm weights reading timm's pretrained
config; refuse attention models for pruning, unknown names and loader keywords from a file; say
which extra to install when timm is missing. No test downloads anything.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

from rcomp.errors import RcompError  # noqa: E402

from conftest import assert_one_line_error, run_cli  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")  # convnext's gamma: pruned right

MODELS = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto"]
SHAPE = (3, 32, 32)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a connection fails the test: timm must never download."""
    def refuse(*a, **k):
        raise AssertionError("a timm test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _build(name: str, seed: int = 0):
    from rcomp.models.registry import build_model

    torch.manual_seed(seed)
    return build_model(f"timm:{name}", 10, SHAPE, dataset="digits").eval()


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    from rcomp.models.loading import save

    folder = tmp_path_factory.mktemp("timm_dense")
    out = {}
    for name in MODELS + ["vit_tiny_patch16_224"]:
        out[name] = folder / f"{name}.safetensors"
        save(_build(name), out[name])
    return out


@pytest.fixture(scope="module")
def pruned(dense, tmp_path_factory) -> dict[str, tuple[Path, object, object]]:
    """name -> (file, the pruned model in memory, its prune report)."""
    from rcomp.models.loading import load, save
    from rcomp.pruning import prune

    folder = tmp_path_factory.mktemp("timm_pruned")
    out = {}
    for name in MODELS:
        model, report = prune(load(dense[name]), 0.5)
        path = folder / f"{name}.p50.safetensors"
        save(model, path)
        out[name] = (path, model.eval(), report)
    return out


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# build, save, reload
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_build_save_reload_identical(name, dense):
    from rcomp.io.header import read_header
    from rcomp.models.loading import load

    model = _build(name)
    again = load(dense[name])
    assert again.meta.arch.name == f"timm:{name}" and again.meta.arch.kwargs == {}
    assert again.meta.input.shape == SHAPE and again.meta.num_classes == 10
    x = _x()
    with torch.no_grad():
        out = again(x)
        assert out.shape == (4, 10)
        assert torch.equal(model(x), out)  # same seed, same architecture: same weights
    meta = read_header(dense[name]).metadata
    assert json.loads(meta["rcomp.arch"]) == {"name": f"timm:{name}", "kwargs": {}}


def test_vit_builds_at_the_given_size_and_reloads(dense):
    from rcomp.models.loading import load

    model = load(dense["vit_tiny_patch16_224"])
    assert model.net.patch_embed.img_size == (32, 32)  # fixed-size models get img_size from the spec
    with torch.no_grad():
        assert torch.equal(model(_x()), _build("vit_tiny_patch16_224")(_x()))


def test_arch_kwargs_are_recorded_and_reused(tmp_path):
    from rcomp.models.loading import load, save
    from rcomp.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("timm:resnet18", 10, SHAPE, kwargs={"drop_rate": 0.2}).eval()
    save(model, tmp_path / "m.safetensors")
    again = load(tmp_path / "m.safetensors")
    assert again.meta.arch.kwargs == {"drop_rate": 0.2} and again.net.drop_rate == 0.2
    with torch.no_grad():
        assert torch.equal(model(_x()), again(_x()))


# ------------------------------------------------------------------------------------------------
# names and keywords a file (or the user) may give
# ------------------------------------------------------------------------------------------------

def test_unknown_name_is_refused_with_a_suggestion():
    from rcomp.models.registry import build_model

    with pytest.raises(RcompError, match="no model 'resnet19'.*did you mean timm:resnet1"):
        build_model("timm:resnet19", 10, SHAPE)


@pytest.mark.parametrize("kw", [{"pretrained": True}, {"checkpoint_path": "/etc/passwd"},
                                {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, {"features_only": True},
                                {"num_classes": 5}, {"cache_dir": "/tmp"}])
def test_loader_keywords_are_refused(kw):
    from rcomp.models.registry import build_model

    with pytest.raises(RcompError, match="is not accepted"):
        build_model("timm:resnet18", 10, SHAPE, kwargs=kw)


@pytest.mark.parametrize("kw", [{"act_layer": "no_such_activation"}, {"depth": 3}])
def test_bad_arguments_are_one_line(kw, tmp_path):
    res = run_cli("finetune", "--arch", "timm:resnet18", "--arch-kwargs", json.dumps(kw), "--data", "digits",
                  "--input-shape", "3,32,32", "--steps-budget", "1", "-o", tmp_path / "m.safetensors")
    assert_one_line_error(res, "timm")
    assert not (tmp_path / "m.safetensors").exists()


def _edit_arch(src: Path, dst: Path, arch: dict) -> Path:
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["rcomp.arch"] = json.dumps(arch)
    raw = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return dst


@pytest.mark.parametrize("arch,needle", [
    ({"name": "timm:evil_model", "kwargs": {}}, "has no model"),
    ({"name": "timm:hf-hub:evil/model", "kwargs": {}}, "timm names are"),
    ({"name": "timm:local-dir:/tmp/x", "kwargs": {}}, "timm names are"),
    ({"name": "timm:../../x", "kwargs": {}}, "timm names are"),
    ({"name": "timm:resnet18", "kwargs": {"pretrained": True}}, "never downloads"),
    ({"name": "timm:resnet18", "kwargs": {"checkpoint_path": "/etc/passwd"}}, "loads a file"),
])
def test_a_checkpoint_naming_timm_weirdness_is_refused(dense, tmp_path, arch, needle):
    bad = _edit_arch(dense["resnet18"], tmp_path / "bad.safetensors", arch)
    res = run_cli("info", bad)
    assert res.code == 0  # info reads the header only
    assert_one_line_error(run_cli("prune", bad, "--ratio", "0.5", "-o", tmp_path / "o.safetensors"), needle)
    assert not (tmp_path / "o.safetensors").exists()


def test_model_name_never_raises_anything_but_rcomp_errors():
    import timm
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from rcomp.models.timm_source import model_name

    known = set(timm.list_models())

    @settings(max_examples=60, deadline=None)
    @given(st.one_of(st.text(max_size=30), st.sampled_from(sorted(known)[:50]).map(lambda n: n + "x")))
    def check(text):
        try:
            got = model_name("timm:" + text)
        except RcompError as exc:
            assert "\n" not in str(exc)
        else:
            assert got == text and (got in known or got in set(timm.list_pretrained()))

    check()


def test_config_files_may_name_timm_models_but_not_factories():
    from rcomp.models.catalog import user_factory_from_file

    assert user_factory_from_file("timm:resnet18") is None
    assert user_factory_from_file("evil.mod:fn") is not None


def test_missing_timm_names_the_extra(monkeypatch, dense, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    res = run_cli("finetune", "--arch", "timm:resnet18", "--data", "digits", "--input-shape", "3,32,32",
                  "--steps-budget", "1", "-o", tmp_path / "m.safetensors")
    assert_one_line_error(res, "needs timm", "pip install 'rcomp[timm]'")
    res = run_cli("attack", dense["resnet18"], "--data", "digits", "--attack", "fgsm", "--eps", "0.1", "-n", "4")
    assert_one_line_error(res, "timm:resnet18 needs timm", "rcomp[timm]")
    assert not (tmp_path / "m.safetensors").exists()


def test_info_models_mentions_timm():
    res = run_cli("info", "--models")
    assert res.code == 0 and "timm:NAME" in res.stdout
    res = run_cli("info", "--models", "--json")
    names = json.loads(res.stdout)["timm"]
    assert "timm:convnext_atto" in names and "timm:resnet18" in names


# ------------------------------------------------------------------------------------------------
# pruning
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_prune_half_reloads_identical(name, pruned):
    from rcomp.models.loading import load

    path, model, report = pruned[name]
    assert 3.3 < report.macs_factor < 4.0, report.as_dict()
    assert report.params_after < report.params_before / 3
    again = load(path)
    x = _x()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert again.meta.compression["pruning"]["macs_after"] == report.macs_after


def test_prune_reloads_modules_with_derived_channel_properties(tmp_path):
    """timm's ConvNormAct exposes in_channels/out_channels as read-only properties of its conv: only the
    conv's attributes are recorded, and the pruned model reloads (regnetx_002 is built of ConvNormAct)."""
    from rcomp.models.loading import load, save
    from rcomp.pruning import prune

    model, _ = prune(_build("regnetx_002"), 0.5)
    save(model, tmp_path / "r.safetensors")
    structure = json.loads(load(tmp_path / "r.safetensors").meta.to_metadata()["rcomp.compression"])["structure"]
    assert "stem.conv" in structure and "stem" not in structure
    with torch.no_grad():
        assert torch.equal(model.eval()(_x()), load(tmp_path / "r.safetensors")(_x()))


def test_convnext_layer_scale_is_recorded_and_checked(pruned, tmp_path):
    """ConvNeXt blocks hold their layer scale ``gamma`` directly: its pruned shape is recorded, and a
    file whose record contradicts the tensor is refused."""
    from rcomp.io.header import read_header

    path = pruned["convnext_atto"][0]
    header = read_header(path)
    structure = json.loads(header.metadata["rcomp.compression"])["structure"]
    block = structure["stages.0.blocks.0"]
    assert block["tensor_shapes"]["gamma"] == list(header.tensors["net.stages.0.blocks.0.gamma"].shape)

    def edited(change) -> Path:
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        h = json.loads(data[8:8 + n])
        comp = json.loads(h["__metadata__"]["rcomp.compression"])
        change(comp["structure"]["stages.0.blocks.0"])
        h["__metadata__"]["rcomp.compression"] = json.dumps(comp)
        raw = json.dumps(h).encode()
        out = tmp_path / f"e{len(list(tmp_path.iterdir()))}.safetensors"
        out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        return out

    lie = edited(lambda b: b["tensor_shapes"].__setitem__("gamma", [7]))
    assert_one_line_error(run_cli("attack", lie, "--data", "digits", "--attack", "fgsm", "--eps", "0.1"),
                          "contradicts")
    ghost = edited(lambda b: b["tensor_shapes"].__setitem__("beta", [7]))
    assert_one_line_error(run_cli("attack", ghost, "--data", "digits", "--attack", "fgsm", "--eps", "0.1"),
                          "does not have")
    bad = edited(lambda b: b["tensor_shapes"].__setitem__("gamma", [0, -1]))
    assert_one_line_error(run_cli("attack", bad, "--data", "digits", "--attack", "fgsm", "--eps", "0.1"),
                          "invalid shape")


def test_prune_cli_on_a_timm_model(dense, tmp_path):
    out = tmp_path / "p.safetensors"
    res = run_cli("prune", dense["mobilenetv3_small_100"], "--ratio", "0.5", "-o", out, "--json")
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["path"] == str(out) and out.exists()
    assert report["macs_factor"] > 3.3


def test_attention_models_are_refused_for_pruning_before_any_work(dense, tmp_path):
    res = run_cli("prune", dense["vit_tiny_patch16_224"], "--ratio", "0.5", "-o", tmp_path / "v.safetensors")
    assert_one_line_error(res, "attention", "heads", "qkv reshape", "quantize it instead")
    res = run_cli("prune", dense["vit_tiny_patch16_224"], "--ratio", "0.5", "--method", "taylor", "--data",
                  "cifar10", "--data-dir", tmp_path / "nothing-here", "-o", tmp_path / "v.safetensors")
    assert_one_line_error(res, "attention")  # refused before the data is even looked at
    assert not (tmp_path / "v.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# quantization, fine-tuning, attacks, bench
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,bits,simulate", [("resnet18", 8, False), ("mobilenetv3_small_100", 8, False),
                                               ("resnet18", 4, True), ("convnext_atto", 4, True)])
def test_quantize_reloads_identical(name, bits, simulate, pruned, tmp_path):
    from rcomp.models.loading import load, save
    from rcomp.quant.ptq import quantize

    path, model, _ = pruned[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(load(path), [_x(16, seed=2)], bits=bits, simulate=simulate)
        save(q, tmp_path / "q.safetensors")
        again = load(tmp_path / "q.safetensors")
        x = _x()
        with torch.no_grad():
            out = q(x)
            assert torch.equal(out, again(x))
            assert out.argmax(1).eq(model(x).argmax(1)).float().mean() >= 0.5  # a quantized twin, not noise
    assert again.meta.compression["quantization"]["mode"] == ("simulated" if simulate else "int8")
    assert again.meta.compression["structure"]  # still pruned


@pytest.mark.slow
def test_finetune_from_arch_and_from_a_pruned_checkpoint(pruned, tmp_path):
    out = tmp_path / "t.safetensors"
    res = run_cli("finetune", "--arch", "timm:mobilenetv3_small_100", "--data", "digits", "--input-shape", "3,32,32",
                  "--steps-budget", "2", "--batch-size", "16", "--eval-n", "32", "-o", out)
    assert res.code == 0, res.stderr
    out2 = tmp_path / "t2.safetensors"
    res = run_cli("finetune", pruned["mobilenetv3_small_100"][0], "--data", "digits", "--adv", "fgsm", "--eps", "0.1",
                  "--steps-budget", "2", "--batch-size", "16", "--eval-n", "32", "-o", out2)
    assert res.code == 0, res.stderr
    from rcomp.models.loading import load

    assert load(out2).num_parameters() == pruned["mobilenetv3_small_100"][1].num_parameters()


@pytest.mark.slow
def test_attack_auto_and_bench_on_a_pruned_timm_model(pruned, dense, tmp_path):
    p = pruned["mobilenetv3_small_100"][0]
    res = run_cli("attack", p, "--data", "digits", "-n", "8", "--attack", "auto", "--eps", "0.1", "--steps", "3",
                  "--queries", "10", "--targets", "1", "--json")
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["n"] == 8 and 0 <= report["worst_case_acc"] <= report["clean_acc"]
    assert report["mode"] == "cascade" and list(report["stage_robust_acc"]) == ["apgd-ce", "apgd-t", "square"]
    res = run_cli("bench", dense["mobilenetv3_small_100"], p, "--data", "digits", "-n", "8", "--attack", "fgsm",
                  "--eps", "0.1", "--latency-batch", "0", "--json")
    assert res.code == 0, res.stderr
    rows = json.loads(res.stdout)["models"]
    assert rows[0]["macs"] > 3.3 * rows[1]["macs"]


# ------------------------------------------------------------------------------------------------
# convert: timm weights, timm's pretrained config
# ------------------------------------------------------------------------------------------------

def test_convert_reads_timm_pretrained_config(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    torch.save(net.state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "vit.safetensors"
    res = run_cli("convert", tmp_path / "vit.pth", "--arch", "timm:vit_tiny_patch16_224", "-o", out)
    assert res.code == 0, res.stderr
    assert "3x224x224 from timm's pretrained config" in res.stderr
    assert "from timm's pretrained config for vit_tiny_patch16_224" in res.stderr
    from rcomp.models.loading import load

    model = load(out)
    cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224")
    assert model.meta.input.shape == cfg.input_size and model.meta.num_classes == 10
    assert model.meta.input.mean == list(cfg.mean) == [0.5, 0.5, 0.5] and model.meta.input.std == list(cfg.std)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), net.eval()((x - 0.5) / 0.5))


def test_convert_user_options_win(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=7)
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r.safetensors"))
    out = tmp_path / "r.rcomp.safetensors"
    res = run_cli("convert", tmp_path / "r.safetensors", "--arch", "timm:resnet18", "--input-shape", "3,32,32",
                  "--mean", "0.1,0.2,0.3", "--std", "0.5,0.5,0.5", "-o", out, "--json")
    assert res.code == 0, res.stderr
    assert "pretrained config" not in res.stderr
    from rcomp.models.loading import load

    model = load(out)
    assert model.meta.input.shape == SHAPE and model.meta.num_classes == 7 and model.meta.input.mean == [0.1, 0.2, 0.3]
    res = run_cli("convert", tmp_path / "r.safetensors", "--arch", "timm:resnet18", "--input-shape", "3,32,32",
                  "-o", tmp_path / "r2.safetensors")
    assert res.code == 0, res.stderr
    assert "from timm's pretrained config for resnet18" in res.stderr  # mean/std: timm's; the size: the user's
    model = load(tmp_path / "r2.safetensors")
    assert model.meta.input.shape == SHAPE and model.meta.input.mean == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_a_recipe_may_name_a_timm_model(tmp_path):
    """timm:NAME is a known source, not user code: recipes (files) may name it, unlike pkg.mod:fn."""
    recipe = tmp_path / "r.yaml"
    body = """stages:
  - name: base
    command: finetune
    options: {{arch: "{arch}", data: digits, input-shape: "3,32,32", steps-budget: 1, batch-size: 8, eval-n: 0}}
"""
    recipe.write_text(body.format(arch="evil.mod:fn"))
    assert_one_line_error(run_cli("run", recipe, "--out-dir", tmp_path / "o1"), "user factory")
    recipe.write_text(body.format(arch="timm:mobilenetv3_small_100"))
    res = run_cli("run", recipe, "--out-dir", tmp_path / "o2", "--json")
    assert res.code == 0, res.stderr
    from rcomp.models.loading import load

    assert load(tmp_path / "o2" / "base.safetensors").meta.arch.name == "timm:mobilenetv3_small_100"
