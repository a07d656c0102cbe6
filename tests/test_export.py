"""`rcomp export`, `rcomp quantize --backend onnxruntime`, and attack/bench on .onnx files (convnet8, digits)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import assert_one_line_error, make_checkpoint, run_cli

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _props(p: Path) -> dict:
    from rcomp.onnx.runtime import read_model

    return read_model(Path(p))[2]


def _export(src: Path, out: Path, *args) -> Path:
    res = run_cli("export", src, "-o", out, "--exporter", "legacy", *args)
    assert res.code == 0, res.stderr
    assert res.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="module")
def exported(trained_digits, tmp_path_factory):
    """(checkpoint, its legacy export) in their own folder."""
    d = tmp_path_factory.mktemp("onnx")
    ckpt = d / "m.safetensors"
    shutil.copy(trained_digits, ckpt)
    return ckpt, _export(ckpt, d / "m.onnx")


@pytest.fixture(scope="module")
def quantized(exported):
    ckpt, onnx_path = exported
    out = onnx_path.with_name("m.int8.onnx")
    res = run_cli("quantize", onnx_path, "--backend", "onnxruntime", "--data", "digits", "--calib-n", "128",
                  "--eval-n", "360", "-o", out, "--json")
    assert res.code == 0, res.stderr
    return out, json.loads(res.stdout), res.stderr


# ----- export -------------------------------------------------------------------

def test_export_metadata_parity_and_dynamic_batch(exported):
    import torch

    from rcomp.models.loading import load
    from rcomp.onnx.runtime import load_onnx

    ckpt, onnx_path = exported
    props = _props(onnx_path)
    info = json.loads(props["rcomp.onnx"])
    assert info["source"]["sha256"] == _sha(ckpt) and info["source"]["path"] == str(ckpt.resolve())
    assert info["opset"] == 18 and info["exporter"] == "legacy"
    par = info["parity"]
    assert par["n"] == 256 and par["top1_agreement"] == 1.0 and par["max_abs_diff"] < 1e-4
    assert "digits test images" in par["inputs"]
    spec = json.loads(props["rcomp.input"])
    assert (spec["channels"], spec["height"], spec["width"]) == (1, 8, 8)
    assert json.loads(props["rcomp.classes"])["num_classes"] == 10
    hist = json.loads(props["rcomp.history"])
    assert hist[-1]["command"] == "export" and hist[-1]["input_sha256"] == _sha(ckpt)
    model, om = load(ckpt), load_onnx(onnx_path, use_source=False)
    for b in (1, 3, 64):  # the batch axis is dynamic
        x = torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            assert (om(x) - model(x)).abs().max() < 1e-4
    assert om.gradient_source == "none (black-box on the exported model)"


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 17), seed=st.integers(0, 2**31 - 1))
def test_onnx_model_matches_the_checkpoint_on_any_batch(exported, batch, seed):
    import torch

    from rcomp.models.loading import load
    from rcomp.onnx.runtime import load_onnx

    ckpt, onnx_path = exported
    x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        a, b = load(ckpt)(x), load_onnx(onnx_path, use_source=False)(x)
    assert a.shape == b.shape == (batch, 10)
    assert torch.equal(a.argmax(1), b.argmax(1)) or (a - b).abs().max() < 1e-4


def test_export_pruned_and_simulated_models_exactly(trained_digits, tmp_path):
    import torch

    from rcomp.models.loading import load
    from rcomp.onnx.runtime import load_onnx

    pruned = tmp_path / "p.safetensors"
    assert run_cli("prune", trained_digits, "--ratio", "0.5", "-o", pruned).code == 0
    sim = tmp_path / "s4.safetensors"
    assert run_cli("quantize", trained_digits, "--simulate", "--bits", "4", "--calib-n", "64", "--eval-n", "0",
                   "-o", sim).code == 0
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for src in (pruned, sim):
        out = _export(src, tmp_path / f"{src.stem}.onnx")
        with torch.inference_mode():
            diff = (load(src)(x) - load_onnx(out, use_source=False)(x)).abs().max()
        assert diff < 1e-4, (src.name, float(diff))
        assert json.loads(_props(out)["rcomp.onnx"])["parity"]["top1_agreement"] == 1.0
    q = json.loads(_props(tmp_path / "s4.onnx")["rcomp.compression"])["quantization"]
    assert q["mode"] == "simulated" and q["bits"] == 4


@pytest.mark.slow
def test_export_with_the_default_dynamo_exporter(trained_digits, tmp_path):
    out = tmp_path / "d.onnx"
    res = run_cli("export", trained_digits, "-o", out, "--parity-n", "64")
    assert res.code == 0, res.stderr
    assert "dynamo exporter, opset 18" in res.stderr
    par = json.loads(_props(out)["rcomp.onnx"])["parity"]
    assert par["top1_agreement"] == 1.0 and par["max_abs_diff"] < 1e-4


def test_export_without_data_uses_random_inputs_and_says_so(tiny_ckpt, tmp_path):
    out = tmp_path / "t.onnx"
    res = run_cli("export", tiny_ckpt, "-o", out, "--exporter", "legacy", "--parity-n", "40")
    assert res.code == 0, res.stderr
    assert "40 seeded random [0, 1] inputs" in res.stderr
    assert "random" in json.loads(_props(out)["rcomp.onnx"])["parity"]["inputs"]


def test_export_refuses_torch_ao_int8_with_the_fix(trained_digits, tmp_path):
    q = tmp_path / "q.safetensors"
    assert run_cli("quantize", trained_digits, "--backend", "x86", "--calib-n", "64", "--eval-n", "0", "-o", q).code == 0
    res = run_cli("export", q, "-o", tmp_path / "q.onnx", "--exporter", "legacy")
    assert_one_line_error(res, "torch.ao int8", "rcomp quantize model.onnx --backend onnxruntime")
    assert not (tmp_path / "q.onnx").exists()


def test_export_below_agreement_exits_1_and_writes_nothing(trained_digits, tmp_path, monkeypatch):
    """A wrong graph (weights scrambled before export, as a faulty exporter would) is never published."""
    import copy

    import torch

    import rcomp.onnx.export as E

    real = E.exportable

    def scrambled(model):
        m = copy.deepcopy(real(model))
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p[torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(0))])
        return m

    monkeypatch.setattr(E, "exportable", scrambled)
    out = tmp_path / "bad.onnx"
    res = run_cli("export", trained_digits, "-o", out, "--exporter", "legacy")
    assert res.code == 1, res.stderr
    assert "agrees with" in res.stderr and "nothing was written" in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


class _LibraryError(Exception):
    pass


def _swallowing_export(*args, **kwargs):
    """torch.export as measured: Ctrl-C in the middle of it surfaced as TorchExportError <- AttributeError <-
    KeyboardInterrupt (the library's broad except raised its own error in the interrupt's place)."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("'NoneType' object has no attribute 'graph'")  # noqa: B904 - as the library does
    except AttributeError as exc:
        raise _LibraryError("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m") from exc


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_ctrl_c_inside_the_exporter_is_an_interrupt_not_its_failure(trained_digits, tmp_path, monkeypatch, command):
    import torch

    monkeypatch.setattr(torch.onnx, "export", _swallowing_export)
    out = tmp_path / "m.onnx"
    args = ["--backend", "onnxruntime", "--data", "digits"] if command == "quantize" else ["--exporter", "legacy"]
    res = run_cli(command, trained_digits, "-o", out, *args)
    assert res.code == 130, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "rcomp: interrupted; no output was written"
    assert "exporter failed" not in res.stderr and "LibraryError" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_gets_the_interrupt_itself(trained_digits, tmp_path, monkeypatch):
    import torch

    import rcomp

    monkeypatch.setattr(torch.onnx, "export", _swallowing_export)
    with pytest.raises(KeyboardInterrupt):
        rcomp.export(trained_digits, output=tmp_path / "m.onnx", exporter="legacy")
    assert list(tmp_path.iterdir()) == []


def test_export_output_rules(exported, tmp_path):
    ckpt, onnx_path = exported
    assert_one_line_error(run_cli("export", ckpt, "-o", onnx_path, "--exporter", "legacy"), "already exists")
    assert_one_line_error(run_cli("export", ckpt, "-o", tmp_path / "x.safetensors"), "must end in .onnx")
    before = onnx_path.read_bytes()
    res = run_cli("export", ckpt, "-o", onnx_path, "--exporter", "legacy", "--force")
    assert res.code == 0 and onnx_path.read_bytes() == before  # same bytes: deterministic export
    assert_one_line_error(run_cli("prune", onnx_path, "--ratio", "0.5"), "is named as an ONNX file")


def test_export_without_the_extra_names_it(trained_digits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    res = run_cli("export", trained_digits, "-o", tmp_path / "m.onnx")
    assert_one_line_error(res, "onnxruntime", "pip install 'rcomp[onnx]'")
    assert not (tmp_path / "m.onnx").exists()


def test_help_does_not_import_onnx():
    code = ("import sys; from rcomp.cli import app; import typer.main; typer.main.get_command(app); "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----- ONNX Runtime int8 -----------------------------------------------------------

@pytest.mark.parametrize("flags,machine,want", [
    ({"avx2", "fma"}, "x86_64", "u8s8-reduce-range"),
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "u8s8"),
    ({"avx2", "avx_vnni"}, "x86_64", "u8s8"),
    (set(), "aarch64", "s8s8"),
])
def test_activation_type_follows_the_cpu(flags, machine, want):
    from rcomp.onnx.ortquant import choose_activation

    got, reason = choose_activation(flags, machine)
    assert got == want and reason


def test_ort_int8_keeps_accuracy_and_records_its_choice(quantized, exported):
    from rcomp.onnx.ortquant import choose_activation
    from rcomp.onnx.runtime import read_model

    out, rep, err = quantized
    act, _ = choose_activation()
    assert f"activation type {act}" in err
    assert rep["accuracy_float"] > 0.85 and abs(rep["accuracy"] - rep["accuracy_float"]) <= 0.02
    assert rep["top1_agreement"] >= 0.97 and rep["eval_n"] == 360
    _, proto, props = read_model(out)
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    q = json.loads(props["rcomp.compression"])["quantization"]
    assert q["mode"] == "onnxruntime-qdq" and q["activation_type"] == act and q["calib_n"] == 128
    info = json.loads(props["rcomp.onnx"])
    assert info["source"]["sha256"] == _sha(exported[0])  # the float checkpoint stays the transfer source
    assert info["quantized_from"]["sha256"] == _sha(exported[1])
    assert out.stat().st_size < exported[1].stat().st_size / 2


def test_info_describes_an_onnx_file_without_torch(quantized, exported):
    res = run_cli("info", quantized[0], "--json")
    assert res.code == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["quantization"]["mode"] == "onnxruntime-qdq" and d["onnx"]["opset"] == 18
    assert d["onnx"]["source"]["sha256"] == _sha(exported[0])
    assert [h["command"] for h in d["history"]][-2:] == ["export", "quantize"]
    from rcomp.models.loading import load

    assert d["params"] == load(exported[0]).num_parameters()


def test_quantize_onnx_needs_the_onnxruntime_backend(exported):
    assert_one_line_error(run_cli("quantize", exported[1], "--data", "digits"), "--backend onnxruntime")


# ----- attack and bench on the exported file --------------------------------------------

@pytest.fixture
def orphan(exported, tmp_path):
    """An ONNX export whose source checkpoint is gone."""
    ckpt = tmp_path / "gone.safetensors"
    shutil.copy(exported[0], ckpt)
    out = _export(ckpt, tmp_path / "gone.onnx", "--parity-n", "32")
    ckpt.unlink()
    return out


def test_gradient_attacks_on_onnx_need_a_surrogate(orphan):
    res = run_cli("attack", orphan, "--data", "digits", "-n", "16", "--attack", "pgd", "--eps", "0.1")
    assert_one_line_error(res, "without gradients", "--surrogate", "gone.safetensors")
    res = run_cli("bench", orphan, "--data", "digits", "-n", "16", "--attack", "auto", "--eps", "0.1")
    assert_one_line_error(res, "apgd-ce", "--surrogate")


def test_square_runs_on_the_onnx_model_itself(orphan):
    res = run_cli("attack", orphan, "--data", "digits", "-n", "48", "--attack", "square", "--eps", "0.1",
                  "--queries", "50", "--json")
    assert res.code == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["gradient_source"] == "none (black-box on the exported model)"
    assert d["robust_acc"]["square"] < d["clean_acc"]


def test_transfer_from_the_source_checkpoint_matches_white_box(exported):
    """PGD through the source checkpoint, scored on its fp32 export, gives the checkpoint's own PGD figure
    (the two compute the same function up to 1e-5)."""
    ckpt, onnx_path = exported
    args = ("--data", "digits", "-n", "64", "--attack", "pgd", "--steps", "5", "--eps", "0.1", "--json")
    on_ckpt = json.loads(run_cli("attack", ckpt, *args).stdout)
    res = run_cli("attack", onnx_path, *args)
    assert res.code == 0, res.stderr
    on_onnx = json.loads(res.stdout)
    assert "source checkpoint" in on_onnx["gradient_source"] and "m.safetensors" in on_onnx["gradient_source"]
    assert on_onnx["clean_acc"] == on_ckpt["clean_acc"]
    assert abs(on_onnx["robust_acc"]["pgd"] - on_ckpt["robust_acc"]["pgd"]) <= 2 / 64
    assert on_onnx["robust_acc"]["pgd"] < on_onnx["clean_acc"] - 0.1


def test_source_with_another_sha256_is_not_used_but_surrogate_is(exported, tmp_path):
    ckpt, _ = exported
    src = tmp_path / "src.safetensors"
    shutil.copy(ckpt, src)
    out = _export(src, tmp_path / "src.onnx", "--parity-n", "32")
    src.unlink()
    make_checkpoint(src, seed=5)  # a different model now sits at the recorded path
    args = ("--data", "digits", "-n", "16", "--attack", "fgsm", "--eps", "0.1")
    assert_one_line_error(run_cli("attack", out, *args), "--surrogate")
    res = run_cli("attack", out, *args, "--surrogate", ckpt, "--json")
    assert res.code == 0, res.stderr
    assert "--surrogate" in json.loads(res.stdout)["gradient_source"]
    assert_one_line_error(run_cli("attack", ckpt, *args, "--surrogate", ckpt), "--surrogate is for ONNX")


def test_bench_puts_checkpoint_and_exports_side_by_side(exported, quantized):
    ckpt, onnx_path = exported
    res = run_cli("bench", ckpt, onnx_path, quantized[0], "--data", "digits", "-n", "64", "--attack", "square",
                  "--eps", "0.1", "--queries", "30", "--latency-batch", "8", "--format", "json")
    assert res.code == 0, res.stderr
    d = json.loads(res.stdout)
    a, b, c = d["models"]
    assert [m["name"] for m in d["models"]] == ["m.safetensors", "m.onnx", "m.int8.onnx"]
    assert a["clean_acc"] == b["clean_acc"] and a["macs"] == b["macs"] == c["macs"] > 0
    assert a["params"] == b["params"] > 0
    from rcomp.onnx.runtime import BLACK_BOX

    assert b["gradient_source"] == c["gradient_source"] == BLACK_BOX  # Square alone: no surrogate was used
    assert "gradient attacks run on" not in res.stderr
    assert c["quantization"]["backend"] == "onnxruntime" and abs(c["clean_acc"] - a["clean_acc"]) <= 0.05
    assert set(b["latency_ms"]) == {"1", "8"} and all(v > 0 for v in b["latency_ms"].values())
    assert "thread_policy" in d
    res = run_cli("bench", onnx_path, quantized[0], "--data", "digits", "-n", "32", "--attack", "fgsm,square",
                  "--eps", "0.1", "--queries", "10", "--latency-batch", "0", "--format", "json")
    assert res.code == 0, res.stderr
    rows = json.loads(res.stdout)["models"]
    assert all(r["gradient_source"].startswith("surrogate m.safetensors") for r in rows)
    said = [ln for ln in res.stderr.splitlines() if "gradient attacks run on the source checkpoint" in ln]
    assert [ln.split(":")[0] for ln in said] == ["m.onnx", "m.int8.onnx"]  # one line per file, named


@pytest.mark.slow
def test_ship_onnx_example_runs(tmp_path):
    """examples/ship-onnx.sh at tiny sizes: the README's path to a shipped file never rots."""
    import os

    env = dict(os.environ)
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1",
               EPOCHS="1", ADV_EPOCHS="1", N="32", EXPORTER="legacy")  # the dynamo exporter has its own tests
    script = Path(__file__).resolve().parent.parent / "examples" / "ship-onnx.sh"
    res = subprocess.run(["bash", str(script), str(tmp_path / "w")], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("robust.safetensors", "robust.onnx", "robust.int8.onnx"):
        assert name in res.stdout
    assert "surrogate robust.safetensors" in res.stdout


def test_python_api_export(exported, tmp_path):
    import rcomp

    res = rcomp.export(exported[0], output=tmp_path / "api.onnx", exporter="legacy", parity_n=32, log=lambda _m: None)
    assert res.model is None and res.path == tmp_path / "api.onnx"
    rep = res.report
    assert rep["path"] == str(tmp_path / "api.onnx") and rep["parity"]["top1_agreement"] == 1.0
    assert rep["sha256"] == _sha(tmp_path / "api.onnx")


@pytest.mark.slow
def test_quantize_a_checkpoint_with_onnxruntime_exports_first(trained_digits, tmp_path):
    ckpt = tmp_path / "c.safetensors"
    shutil.copy(trained_digits, ckpt)
    res = run_cli("quantize", ckpt, "--backend", "onnxruntime", "--calib-n", "64", "--eval-n", "100")
    assert res.code == 0, res.stderr
    out = tmp_path / "c.int8.onnx"
    assert res.stdout.strip() == str(out) and "exporting it to ONNX first" in res.stderr
    props = _props(out)
    assert [h["command"] for h in json.loads(props["rcomp.history"])][-2:] == ["export", "quantize"]
    info = json.loads(props["rcomp.onnx"])
    assert info["source"]["sha256"] == _sha(ckpt) == info["quantized_from"]["sha256"]
    assert not (tmp_path / "c.onnx").exists()  # the fp32 export stays in memory


def _equal_biases(path: Path) -> Path:
    """A convnet8 whose layers all have zero biases: the legacy exporter stores them once and shares them
    through Identity nodes (as it does for the folded BatchNorms of any untrained network)."""
    import torch

    from rcomp.models.loading import load, save

    make_checkpoint(path)
    m = load(path)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    save(m, path, force=True)
    return path


def _int8_layers(path: Path) -> tuple[int, int]:
    """(Conv/Gemm layers whose input, weight and bias all come from DequantizeLinear, all of them)."""
    from rcomp.onnx.runtime import read_model

    g = read_model(path)[1].graph
    made = {o: n.op_type for n in g.node for o in n.output}
    layers = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    return sum(all(made.get(i) == "DequantizeLinear" for i in n.input) for n in layers), len(layers)


def test_ort_int8_quantizes_layers_whose_equal_biases_the_exporter_shared(tmp_path):
    ckpt = _equal_biases(tmp_path / "z.safetensors")
    onnx_path = _export(ckpt, tmp_path / "z.onnx", "--data", "digits", "--parity-n", "32")
    from rcomp.onnx.runtime import read_model

    assert any(n.op_type == "Identity" for n in read_model(onnx_path)[1].graph.node)  # the case arises
    res = run_cli("quantize", onnx_path, "--backend", "onnxruntime", "--data", "digits", "--calib-n", "32",
                  "--eval-n", "0", "-o", tmp_path / "z.int8.onnx")
    assert res.code == 0, res.stderr
    assert "WARNING" not in res.stderr and "stayed float" not in res.stderr
    done, total = _int8_layers(tmp_path / "z.int8.onnx")
    assert done == total == 8
    q = json.loads(_props(tmp_path / "z.int8.onnx")["rcomp.compression"])["quantization"]
    assert q["float_layers"] == 0


def test_ort_int8_says_which_layers_stayed_float(tmp_path, monkeypatch):
    from rcomp.onnx import ortquant

    ckpt = _equal_biases(tmp_path / "z.safetensors")
    onnx_path = _export(ckpt, tmp_path / "z.onnx", "--data", "digits", "--parity-n", "32")
    monkeypatch.setattr(ortquant, "unshare_initializers", lambda proto: 0)  # the quantizer as it was
    res = run_cli("quantize", onnx_path, "--backend", "onnxruntime", "--data", "digits", "--calib-n", "32",
                  "--eval-n", "0", "-o", tmp_path / "z.int8.onnx")
    assert res.code == 0, res.stderr
    done, total = _int8_layers(tmp_path / "z.int8.onnx")
    assert done < total
    line = next(ln for ln in res.stderr.splitlines() if "stayed float" in ln)
    assert line.startswith(f"{total - done} of {total} Conv/Gemm/MatMul layers stayed float")
    assert "WARNING" not in res.stderr
    q = json.loads(_props(tmp_path / "z.int8.onnx")["rcomp.compression"])["quantization"]
    assert q["float_layers"] == total - done


def test_foreign_or_broken_onnx_files_are_refused_in_one_line(exported, tmp_path):
    from rcomp.onnx.export import with_metadata

    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(with_metadata(exported[1].read_bytes(), {}))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    lying = tmp_path / "lying.onnx"
    props = _props(exported[1])
    props["rcomp.classes"] = json.dumps({"num_classes": 7, "names": None})
    lying.write_bytes(with_metadata(exported[1].read_bytes(), props))
    for path, needle in ((foreign, "without rcomp metadata"), (garbage, "not an ONNX model"), (lying, "7 classes")):
        for cmd in (("attack", path, "--data", "digits", "--attack", "square", "--eps", "0.1"), ("info", path)):
            assert_one_line_error(run_cli(*cmd), needle)


def _graph_with_props(exported, tmp_path, name: str, net, out_dims: dict, side: int = 8, **edits) -> Path:
    """A plain torch graph (batch, channel, height and width all free) carrying the rcomp metadata of
    ``exported``, edited by ``edits`` (key -> JSON value): files the static checks cannot judge."""
    import io

    import torch

    from rcomp.onnx.export import with_metadata

    buf = io.BytesIO()
    torch.onnx.export(net.eval(), (torch.rand(2, 1, side, side),), buf, dynamo=False, input_names=["images"],
                      output_names=["logits"], opset_version=18,
                      dynamic_axes={"images": {0: "n", 1: "c", 2: "h", 3: "w"}, "logits": out_dims})
    props = _props(exported[1])
    props.update({k: json.dumps(v) for k, v in edits.items()})
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(with_metadata(buf.getvalue(), props))
    return path


def test_onnx_files_the_graph_checks_cannot_judge_are_refused_in_one_line(exported, tmp_path):
    """Found by trying the product as an attacker: each of these ended in an internal error (with onnxruntime's
    coloured log lines) or was scored silently (7 logits read as 10 classes; NaN logits as 10% accuracy)."""
    import torch

    def linear(k: int, fill=None):
        lin = torch.nn.Linear(64 if k != 49 else 49, 10 if k == 49 else k)
        if fill is not None:
            torch.nn.init.constant_(lin.weight, fill)
        return torch.nn.Sequential(torch.nn.Flatten(), lin)

    src = json.loads(_props(exported[1])["rcomp.onnx"])
    cases = [
        (_graph_with_props(exported, tmp_path, "wrong_input", linear(49), {0: "n"}, 7), "does not run on images of 1x8x8"),
        (_graph_with_props(exported, tmp_path, "seven", linear(7), {0: "n", 1: "k"}), "logits of shape (2, 7)"),
        (_graph_with_props(exported, tmp_path, "nan", linear(10, float("nan")), {0: "n"}), "non-finite logits"),
        (_graph_with_props(exported, tmp_path, "src_str", linear(10), {0: "n"}, **{"rcomp.onnx": {**src, "source": "x"}}),
         "source is not an object"),
        (_graph_with_props(exported, tmp_path, "src_num", linear(10), {0: "n"},
                           **{"rcomp.onnx": {**src, "source": {"path": 12345}}}), "source.path is not a string"),
    ]
    for path, needle in cases:
        for cmd in (("attack", path, "--data", "digits", "--attack", "square", "--eps", "0.1", "-n", "8"),
                    ("bench", path, "--data", "digits", "-n", "8", "--latency-batch", "0"),
                    ("quantize", path, "--backend", "onnxruntime", "--data", "digits", "--calib-n", "16")):
            res = run_cli(*cmd)
            assert_one_line_error(res, needle)
            assert "onnxruntime:" not in res.stderr
        if needle.startswith("source"):
            assert_one_line_error(run_cli("info", path), needle)
            assert_one_line_error(run_cli("info", path, "--json"), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p, _ in cases)  # nothing written


def test_an_onnx_surrogate_is_refused_and_a_loaded_model_is_taken(exported, quantized, tmp_path):
    import rcomp

    res = run_cli("attack", quantized[0], "--data", "digits", "--attack", "pgd", "--eps", "0.1", "-n", "8",
                  "--surrogate", exported[1])
    assert_one_line_error(res, "is an ONNX file, which has no gradients either")
    ckpt = rcomp.load(exported[0])
    rep = rcomp.attack(quantized[0], data="digits", attack="fgsm", eps=0.1, n=16, surrogate=ckpt, log=lambda m: None)
    by_path = rcomp.attack(quantized[0], data="digits", attack="fgsm", eps=0.1, n=16, surrogate=exported[0],
                           log=lambda m: None)
    assert rep.report["robust_acc"] == by_path.report["robust_acc"]


def test_onnxruntime_errors_lose_their_machinery():
    from rcomp.onnx.runtime import ort_reason

    raw = ("[ONNXRuntimeError] : 1 : FAIL : Load model from x.onnx failed:/onnxruntime_src/onnxruntime/core/graph/"
           "model_load_utils.h:46 void onnxruntime::model_load_utils::ValidateOpsetForDomain(const std::unordered_map"
           "<std::basic_string<char>, int>&, const onnxruntime::logging::Logger*, bool, const string&, int) ONNX "
           "Runtime only *guarantees* support for models stamped with official released onnx opset versions. Opset "
           "99 is under development")
    got = ort_reason(RuntimeError(raw))
    assert got.startswith("Load model from x.onnx failed:ONNX Runtime only *guarantees* support") and "Opset" in got
    assert "onnxruntime_src" not in got and "[ONNXRuntimeError]" not in got


def test_refusals_name_the_fix_that_applies_to_onnx_files(exported, tmp_path):
    from rcomp.onnx.export import with_metadata

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("info", empty), "is empty (0 bytes)")
    props = _props(exported[1])
    del props["rcomp.input"]
    no_input = tmp_path / "no_input.onnx"
    no_input.write_bytes(with_metadata(exported[1].read_bytes(), props))
    res = run_cli("info", no_input)
    assert_one_line_error(res, "re-export the checkpoint with rcomp export")
    assert "convert" not in res.stderr
    res = run_cli("bench", exported[1], "--data", "digits", "-n", "8", "--compile")
    assert_one_line_error(res, "is an ONNX file, run by onnxruntime: drop --compile")
    assert "pt2e" not in res.stderr.split("checkpoints;")[1]
    res = run_cli("prune", exported[1], "--ratio", "0.5")
    assert_one_line_error(res, "is named as an ONNX file (.onnx)")


def test_info_on_an_examples_file_says_what_it_is(exported, tmp_path):
    out = tmp_path / "adv.safetensors"
    res = run_cli("attack", exported[0], "--data", "digits", "--attack", "fgsm", "--eps", "0.1", "-n", "8", "-o", out)
    assert res.code == 0, res.stderr
    res = run_cli("info", out)
    assert_one_line_error(res, "holds adversarial examples written by rcomp attack -o, not a model")
    assert "convert" not in res.stderr


def test_quantize_onnxruntime_refuses_a_quantized_checkpoint_before_exporting(trained_digits, tmp_path):
    """A simulated 4-bit checkpoint was exported and parity-checked (seconds) before 'already quantized'."""
    sim = tmp_path / "sim4.safetensors"
    assert run_cli("quantize", trained_digits, "--bits", "4", "--simulate", "--data", "digits", "--calib-n", "32",
                   "--eval-n", "0", "-o", sim).code == 0
    res = run_cli("quantize", sim, "--backend", "onnxruntime", "--data", "digits")
    assert_one_line_error(res, "sim4.safetensors is already quantized (simulated int4)")
    assert "exporting it to ONNX first" not in res.stderr and not list(tmp_path.glob("*.onnx"))
