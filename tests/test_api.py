"""The Python API's one shape: every stage function takes a loaded model or a checkpoint path and returns
an ``rcomp.Result`` (``.model``, ``.report`` = what ``--json`` prints, ``.path`` = the file ``output=``
named, written as ``-o`` is); it never changes its input and writes nothing without ``output=``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import rcomp

from conftest import make_checkpoint

QUIET = {"log": lambda _m: None}

#: stage -> (options, output suffix, whether it makes a model)
STAGES = {
    "prune": ({"ratio": 0.5}, ".safetensors", True),
    "quantize": ({"calib_n": 32, "eval_n": 16}, ".safetensors", True),
    "finetune": ({"epochs": 1, "n": 32, "eval_n": 0, "batch_size": 32}, ".safetensors", True),
    "attack": ({"attack": "fgsm", "eps": 0.1, "n": 16}, ".safetensors", False),
    "bench": ({"n": 16, "latency_batch": 0, "attack": "fgsm", "eps": 0.1}, ".txt", False),
    "export": ({"exporter": "legacy", "parity_n": 16}, ".onnx", False),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A seeded convnet8 that records digits (so every stage finds its data)."""
    return make_checkpoint(tmp_path_factory.mktemp("api") / "m.safetensors", dataset="digits")


def _call(name: str, item, **kw):
    opts = dict(STAGES[name][0])
    return getattr(rcomp, name)([item] if name == "bench" else item, **QUIET, **opts, **kw)


def _cli_json(cli, name: str, ckpt: Path, out: Path) -> dict:
    argv = [name, ckpt]
    for k, v in STAGES[name][0].items():
        argv += [f"-{k}" if len(k) == 1 else f"--{k.replace('_', '-')}", v]
    argv += ["-o", out, *(["--format", "json"] if name == "bench" else ["--json"])]
    res = cli(*argv)
    assert res.code == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, json.dumps(model.meta.history),
            json.dumps(model.meta.compression, default=str), model.training,
            {p.device for p in model.parameters()}, model.source_path, model.source_sha256)


def _same(a, b) -> bool:
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_returns_one_shape_and_writes_nothing_without_output(name, ckpt, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = rcomp.load(ckpt)
    before = _snapshot(model)
    res = _call(name, model)
    assert type(res) is rcomp.Result
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.path = Path("x")  # type: ignore[misc]
    assert res.path is None and os.listdir(tmp_path) == []  # nothing written without output=
    assert repr(res).startswith("Result(model=") and len(repr(res)) < 2000
    makes_model = STAGES[name][2]
    if makes_model:
        assert isinstance(res.model, rcomp.Classifier) and res.model is not model
        assert res.model.meta.history[-1]["command"] == name
        assert res.report["path"] is None and res.report["sha256"] is None
    else:
        assert res.model is None
    assert _same(_snapshot(model), before), f"rcomp.{name} changed its input model"
    # .report is what the command line prints with --json, key for key
    printed = _cli_json(cli, name, ckpt, tmp_path / f"cli{STAGES[name][1]}")
    assert set(res.report) == set(printed), set(res.report) ^ set(printed)


@pytest.mark.parametrize("name", list(STAGES))
def test_no_stage_changes_a_pruned_model_in_training_mode(name, ckpt, tmp_path, monkeypatch):
    """The input a notebook hands over mid-work: made in memory by prune (its structure differs from the
    architecture's), left in training mode. quantize used to switch it to eval mode and write its pruned
    structure into the caller's metadata."""
    monkeypatch.chdir(tmp_path)
    model = rcomp.prune(rcomp.load(ckpt), ratio=0.5, **QUIET).model.train()
    before = _snapshot(model)
    assert before[3] is True and "structure" not in json.loads(before[2])
    _call(name, model)
    assert _same(_snapshot(model), before), f"rcomp.{name} changed its input model"


@pytest.mark.parametrize("name", list(STAGES))
def test_output_is_written_like_dash_o_and_reloads(name, ckpt, tmp_path):
    out = tmp_path / f"out{STAGES[name][1]}"
    res = _call(name, str(ckpt), output=out)
    assert res.path == out and out.is_file()
    if name == "bench":
        assert "m.safetensors" in out.read_text() and res.report["models"][0]["path"] == str(ckpt)
    elif name == "attack":
        from rcomp.io.examples import load_examples

        x, xa, y, info = load_examples(out)
        assert len(y) == 16 and info["source_checkpoint"] == str(ckpt)
        assert res.report["output"] == str(out)
    elif name == "export":
        from rcomp.onnx.runtime import load_onnx

        assert load_onnx(out).meta.arch.name == "convnet8" and res.report["path"] == str(out)
        assert len(res.report["sha256"]) == 64
    else:
        back = rcomp.load(out)
        assert res.report["path"] == str(out) and res.report["sha256"] == back.source_sha256
        assert back.meta.history == res.model.meta.history
        x = torch.rand(4, *back.meta.input.shape)
        with torch.inference_mode():
            assert torch.equal(back(x), res.model(x))
    # output= refuses an existing file without force=True, and keeps it
    kept = out.read_bytes()
    with pytest.raises(rcomp.RcompError, match="exists"):
        _call(name, str(ckpt), output=out)
    assert out.read_bytes() == kept
    assert _call(name, str(ckpt), output=out, force=True).path == out


@pytest.mark.parametrize("name", ["prune", "quantize", "finetune", "attack"])  # export: output ends in .onnx
def test_output_never_overwrites_the_input_even_given_as_a_loaded_model(name, tmp_path):
    src = make_checkpoint(tmp_path / "m.safetensors", dataset="digits")
    kept = src.read_bytes()
    for item in (str(src), rcomp.load(src)):
        with pytest.raises(rcomp.RcompError, match="is the input file"):
            _call(name, item, output=src, force=True)
    assert src.read_bytes() == kept


def test_finetune_from_scratch_and_convert_return_the_same_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = rcomp.finetune(arch="convnet8", data="digits", epochs=1, n=32, eval_n=0, batch_size=32, **QUIET)
    assert isinstance(res.model, rcomp.Classifier) and res.path is None and os.listdir(tmp_path) == []
    assert res.report["epochs"][0]["epoch"] == 1 and res.report["path"] is None
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in res.model.net.state_dict().items()}, str(weights))
    conv = rcomp.convert(weights, arch="convnet8", input_shape="1,8,8", **QUIET)
    assert isinstance(conv.model, rcomp.Classifier) and conv.path is None
    assert conv.report["params"] == sum(p.numel() for p in res.model.parameters())
    out = tmp_path / "c.safetensors"
    conv = rcomp.convert(weights, arch="convnet8", input_shape="1,8,8", output=out, **QUIET)
    assert conv.path == out and rcomp.load(out).meta.history[-1]["command"] == "convert"
    with pytest.raises(rcomp.RcompError, match="exists"):
        rcomp.convert(weights, arch="convnet8", input_shape="1,8,8", output=out, **QUIET)


def test_api_writes_the_bytes_the_command_line_writes(ckpt, cli, tmp_path, monkeypatch):
    """output= goes through the stage's own writer: a seeded prune is the same file either way."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    a, b = tmp_path / "api.safetensors", tmp_path / "cli.safetensors"
    rcomp.prune(str(ckpt), ratio=0.5, output=a, **QUIET)
    assert cli("prune", ckpt, "--ratio", "0.5", "-o", b).code == 0
    assert a.read_bytes() == b.read_bytes()


def test_a_model_made_in_memory_exports_without_a_source(ckpt, tmp_path):
    pruned = rcomp.prune(rcomp.load(ckpt), ratio=0.5, **QUIET).model
    res = rcomp.export(pruned, output=tmp_path / "p.onnx", **STAGES["export"][0], **QUIET)
    assert res.report["source"] is None and res.report["parity"]["top1_agreement"] == 1.0
    from rcomp.onnx.runtime import load_onnx

    back = load_onnx(res.path)
    assert back.meta.history[-1]["command"] == "export" and back.meta.history[-1]["input_sha256"] is None
    assert pruned.meta.history[-1]["command"] == "prune"  # the export entry went on a copy


def test_onnxruntime_quantize_needs_output_in_the_api(ckpt):
    with pytest.raises(rcomp.RcompError, match="give output="):
        rcomp.quantize(str(ckpt), backend="onnxruntime", **QUIET)


def test_a_callers_model_is_moved_only_as_a_copy(ckpt):
    """attack and bench run on --device: a model handed over on another device is copied there, never moved
    (checked with torch's meta device, which every build has; on CUDA the same call is the one users make)."""
    from rcomp.models.wrapper import on_device

    model = rcomp.load(ckpt)
    assert on_device(model, "cpu") is model  # already there: no copy
    moved = on_device(model, "meta")
    assert moved is not model and {p.device.type for p in moved.parameters()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_attack_and_bench_place_the_callers_model_through_on_device(ckpt, monkeypatch):
    """The stages ask on_device for the model they run (a spy records the object it is given)."""
    import rcomp.models.wrapper as W

    seen = []
    real = W.on_device
    monkeypatch.setattr(W, "on_device", lambda m, d: (seen.append(m), real(m, d))[1])
    model = rcomp.load(ckpt)
    _call("attack", model)
    _call("bench", model)
    assert len(seen) >= 2 and all(m is model or m.meta is not model.meta for m in seen) and model in seen


def test_bench_below_fail_under_raises_with_the_result_readable(ckpt, tmp_path):
    """A gate that fails still measured: the ThresholdError carries the Result (report and written file)."""
    from rcomp.errors import ThresholdError

    out = tmp_path / "table.json"
    with pytest.raises(ThresholdError, match="below --fail-under") as info:
        _call("bench", str(ckpt), fail_under="clean=1", output=out)
    res = info.value.result
    assert type(res) is rcomp.Result and res.path == out and out.exists()
    assert res.report["models"][0]["clean_acc"] < 1


def test_bench_takes_one_path_or_model_alone(ckpt):
    """``rcomp.bench("m.onnx")`` iterated the string's characters ("checkpoint m does not exist")."""
    opts = dict(STAGES["bench"][0])
    rows = [rcomp.bench(item, **QUIET, **opts).report["models"] for item in (str(ckpt), ckpt, rcomp.load(ckpt))]
    assert [len(r) for r in rows] == [1, 1, 1]
    assert rows[0][0]["clean_acc"] == rows[1][0]["clean_acc"] == rows[2][0]["clean_acc"]
    assert rows[0][0]["name"] == "m.safetensors"


def test_a_path_option_refuses_other_objects_in_one_line(ckpt):
    with pytest.raises(rcomp.RcompError, match=r"^output takes a path, not a dict$"):
        rcomp.prune(ckpt, ratio=0.5, output={"a": 1}, **QUIET)
