"""CLI conventions, `rcomp info` and `rcomp convert` end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torchvision

import rcomp
from rcomp.models.loading import load

from conftest import assert_one_line_error, make_checkpoint


def test_version_and_help(cli):
    res = cli("--version")
    assert res.code == 0 and res.stdout.strip() == f"rcomp {rcomp.__version__}"
    res = cli("--help")
    assert res.code == 0 and "info" in res.stdout and "convert" in res.stdout
    for cmd in ("info", "convert"):
        res = cli(cmd, "--help")
        assert res.code == 0 and "Example" in res.stdout, cmd


def test_help_and_info_do_not_import_torch(tiny_ckpt):
    code = (
        "import sys\n"
        "from rcomp.cli import main\n"
        f"for args in (['--help'], ['info', '--help'], ['info', {str(tiny_ckpt)!r}, '--json']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'torchvision', 'torch_pruning') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stderr


@pytest.mark.parametrize("arch,wrap", [("resnet18", "plain"), ("mobilenet_v2", "ddp")])
def test_convert_torchvision_state_dict(tmp_path, cli, arch, wrap):
    torch.manual_seed(0)
    ref = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    sd = ref.state_dict()
    src = tmp_path / f"{arch}.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}} if wrap == "ddp" else sd, src)
    out = tmp_path / f"{arch}.safetensors"
    res = cli("convert", src, "--arch", arch, "--input-shape", "3,64,64", "--normalize", "imagenet", "-o", out)
    assert res.code == 0, res.stderr
    assert res.stdout.strip() == str(out)  # only the path on stdout

    res = cli("info", out, "--json")
    assert res.code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["params"] == sum(p.numel() for p in ref.parameters())
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert info["num_classes"] == 10  # inferred from the weights
    assert info["history"][0]["command"] == "convert"
    assert info["history"][0]["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    model = load(out)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = ref((x - model.normalize.mean) / model.normalize.std)
        assert torch.equal(model(x), expected)

    human = cli("info", out)
    assert human.code == 0 and arch in human.stdout and "sha256" in human.stdout


def test_convert_reports_mismatch_by_name(tmp_path, cli):
    src = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), src)
    assert_one_line_error(cli("convert", src, "--arch", "resnet34", "-o", tmp_path / "x.safetensors"),
                          "missing keys", "layer")
    assert_one_line_error(cli("convert", src, "--arch", "resnet18", "--num-classes", "5",
                              "-o", tmp_path / "y.safetensors"), "fc.weight")


def test_convert_refuses_pickled_objects(tmp_path, cli):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    src = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, src)
    res = cli("convert", src, "--arch", "mlp", "-o", tmp_path / "e.safetensors")
    assert_one_line_error(res, "never unpickles")
    assert not (tmp_path / "e.safetensors").exists()


def test_convert_plain_safetensors_and_default_output(tmp_path, cli):
    from safetensors.torch import save_file

    from rcomp.models.builtin import ConvNet8

    torch.manual_seed(0)
    net = ConvNet8(1, 8, 8, 10)
    src = tmp_path / "weights.safetensors"
    save_file(net.state_dict(), str(src))
    res = cli("convert", src, "--arch", "convnet8", "--input-shape", "1,8,8")
    assert res.code == 0, res.stderr
    out = tmp_path / "weights.rcomp.safetensors"
    assert res.stdout.strip() == str(out) and out.exists()
    # existing output: refused without --force, accepted with it
    assert_one_line_error(cli("convert", src, "--arch", "convnet8", "--input-shape", "1,8,8"), "--force")
    assert cli("convert", src, "--arch", "convnet8", "--input-shape", "1,8,8", "--force").code == 0
    # the output may never be the input
    assert_one_line_error(cli("convert", src, "--arch", "convnet8", "-o", src, "--force"), "input")


def test_input_path_from_stdin(tiny_ckpt, cli):
    res = cli("info", "--json", stdin=f"some log line\n{tiny_ckpt}\n")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["path"] == str(tiny_ckpt)


def test_config_file_supplies_defaults(tmp_path, cli):
    from safetensors.torch import save_file

    from rcomp.models.builtin import MLP

    src = tmp_path / "w.safetensors"
    save_file(MLP(64, 4).state_dict(), str(src))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("convert:\n  arch: mlp\n  input-shape: 1,8,8\n  dataset: digits\n")
    res = cli("convert", src, "--config", cfg, "-o", tmp_path / "o.safetensors")
    assert res.code == 0, res.stderr
    assert load(tmp_path / "o.safetensors").meta.dataset == "digits"
    cfg.write_text("no_such_option: 1\n")
    assert_one_line_error(cli("convert", src, "--config", cfg, "--arch", "mlp"), "has no option --no-such-option")


@pytest.mark.parametrize("args,needle", [
    (["info", "missing.safetensors"], "does not exist"),
    (["convert", "missing.pth", "--arch", "mlp"], "does not exist"),
    (["info"], "give a checkpoint"),
])
def test_bad_input_one_line(cli, args, needle):
    assert_one_line_error(cli(*args), needle)


def test_unknown_arch_suggests(tmp_path, cli):
    src = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, src)
    assert_one_line_error(cli("convert", src, "--arch", "resnet19", "--num-classes", "3"), "did you mean")


def test_info_lists_models_and_datasets(cli):
    res = cli("info", "--models", "--json")
    names = json.loads(res.stdout)
    assert "convnet8" in names["builtin"] and "resnet18" in names["torchvision"]
    res = cli("info", "--datasets")
    assert "digits" in res.stdout and "cifar10" in res.stdout
    assert "torchvision:     NAME (e.g. --arch resnet18): " in cli("info", "--models").stdout


def test_a_torchvision_prefix_is_answered_with_the_plain_name(cli, tmp_path):
    """`info --models` listed 'torchvision: ... mobilenet_v2'; `--arch torchvision:mobilenet_v2` then failed with
    'torchvision has no callable' and no way out."""
    res = cli("finetune", "--arch", "torchvision:mobilenet_v2", "--data", "digits", "--epochs", "1", "-n", "8",
              "-o", tmp_path / "m.safetensors")
    assert_one_line_error(res, "torchvision's models are named without a prefix: --arch mobilenet_v2")


def test_debug_shows_traceback(cli):
    res = cli("--debug", "info", "nope.safetensors")
    assert res.code == 2 and "Traceback" in res.stderr


def test_python_m_rcomp(tiny_ckpt):
    res = subprocess.run([sys.executable, "-m", "rcomp", "info", str(tiny_ckpt), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["arch"] == "convnet8"


def test_several_piped_paths_are_rows_of_bench_and_refused_by_one_input_commands(tmp_path, cli):
    """`printf 'a\nb\n' | rcomp bench` kept only b, silently."""
    a = make_checkpoint(tmp_path / "a.safetensors", dataset="digits")
    b = make_checkpoint(tmp_path / "b.safetensors", dataset="digits", seed=1)
    res = cli("bench", "-n", "8", "--latency-batch", "0", "--format", "json", stdin=f"{a}\nnot a file\n{b}\n")
    assert res.code == 0, res.stderr
    assert [m["name"] for m in json.loads(res.stdout)["models"]] == ["a.safetensors", "b.safetensors"]
    assert "1 line(s) that name no file skipped (not a file)" in res.stderr
    res = cli("bench", "-n", "8", "--latency-batch", "0", "--format", "json", stdin=f"{'x' * 5000}\n{a}\n")
    assert res.code == 0, res.stderr  # a name too long for the file system names no file (it raised OSError)
    assert_one_line_error(cli("info", stdin=f"{a}\n{b}\n"), "stdin names 2 files")


def test_running_out_of_memory_is_one_line(tmp_path, cli, monkeypatch):
    import rcomp.data.registry as R

    def huge(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 289910292480 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(R, "get_dataset", huge)
    ckpt = make_checkpoint(tmp_path / "a.safetensors", dataset="digits")
    res = cli("attack", ckpt, "--data", "digits", "--attack", "fgsm", "--eps", "0.1", "-n", "8")
    assert_one_line_error(res, "ran out of memory; nothing was written. Lower --batch-size")
    assert "alloc_cpu" not in res.stderr and "internal error" not in res.stderr


def test_bench_output_format_follows_the_suffix_unless_given(tmp_path, cli):
    """`bench -o b.json` wrote the text table into the .json file."""
    a = make_checkpoint(tmp_path / "a.safetensors", dataset="digits")
    common = ("bench", a, "-n", "8", "--latency-batch", "0")
    res = cli(*common, "-o", tmp_path / "b.json")
    assert res.code == 0, res.stderr
    assert json.loads((tmp_path / "b.json").read_text())["models"][0]["name"] == "a.safetensors"
    assert "--format json (from the suffix of b.json" in res.stderr
    res = cli(*common, "-o", tmp_path / "b.csv")
    assert res.code == 0 and (tmp_path / "b.csv").read_text().startswith("path,")
    res = cli(*common, "--format", "table", "-o", tmp_path / "t.json")
    assert res.code == 0 and "from the suffix" not in res.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads((tmp_path / "t.json").read_text())


@pytest.mark.parametrize("argv,ignored", [(["--version"], True), (["info", "/nonexistent.safetensors"], False)])
def test_a_finished_run_is_not_turned_into_an_exit_by_a_late_ctrl_c(argv, ignored):
    """SIGINT while the interpreter freed the models after `quantize` had written and printed its output: the
    process died of SIGINT (the shell saw 130, "interrupted") although the output was there."""
    code = ("import signal, sys\n"
            "from rcomp.cli import main\n"
            "real = sys.exit\n"
            "def ex(c):\n"
            "    print('ignored' if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 'default', file=sys.stderr)\n"
            "    real(c)\n"
            "sys.exit = ex\n"
            f"sys.argv = ['rcomp', *{argv!r}]\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stderr.strip().splitlines()[-1] == ("ignored" if ignored else "default"), res.stderr
    assert (res.returncode == 0) == ignored


@pytest.mark.parametrize("compression", [{"quantization": "int8"}, {"pruning": "yes"}, {"quantization": [8]}])
def test_a_compression_record_that_is_not_an_object_is_refused_in_one_line(tmp_path, cli, compression):
    """`info` ended in an internal error (AttributeError) and `attack` ran as if nothing were wrong."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = make_checkpoint(tmp_path / "a.safetensors", dataset="digits")
    with safe_open(str(src), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    meta["rcomp.compression"] = json.dumps(compression)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    for args in (("info", bad), ("info", bad, "--json"), ("attack", bad, "--attack", "fgsm", "--eps", "0.1", "-n", "8")):
        assert_one_line_error(cli(*args), f"compression.{next(iter(compression))} must be an object")
