"""No silent wrong answers (issue 16): each default that used to give a wrong model or figure with exit 0,
checked end to end on the command line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import rcomp

from conftest import assert_one_line_error, make_checkpoint


def _png_folder(root, size=(12, 10), per_class=6, classes=("cat", "dog")):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("L", size, color=i * 40).save(root / c / f"{i}.png")
    return root


def test_convert_refuses_to_guess_imagenet_normalisation_off_the_native_shape(cli, tmp_path):
    import torchvision

    torch.manual_seed(0)
    src = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), src)
    res = cli("convert", src, "--arch", "resnet18", "--input-shape", "3,32,32", "-o", tmp_path / "a.safetensors")
    assert_one_line_error(res, "--normalize")
    res = cli("convert", src, "--arch", "resnet18", "--input-shape", "3,32,32", "--normalize", "none",
              "-o", tmp_path / "b.safetensors")
    assert res.code == 0, res.stderr
    assert "normalisation mean [0.0, 0.0, 0.0]" in res.stderr
    assert rcomp.load(tmp_path / "b.safetensors").meta.input.mean == [0.0, 0.0, 0.0]


def test_convert_with_data_refuses_a_near_chance_model(cli, tmp_path):
    """Weights that score at chance after conversion (here: untrained) are refused, naming --mean/--std."""
    from safetensors.torch import save_file

    from rcomp.models.registry import build_model

    torch.manual_seed(0)
    net = build_model("convnet8", 10, (1, 8, 8)).net
    src = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    res = cli("convert", src, "--arch", "convnet8", "--input-shape", "1,8,8", "--data", "digits",
              "-o", tmp_path / "c.safetensors")
    last = res.stderr.strip().splitlines()[-1]
    assert res.code == 2 and last.startswith("rcomp: error:") and "near chance" in last and "--mean" in last
    assert "Traceback" not in res.stderr and "normalisation mean [0.0]" in res.stderr
    assert not (tmp_path / "c.safetensors").exists()


def test_imagefolder_trains_at_the_images_own_shape(cli, tmp_path):
    root = _png_folder(tmp_path / "imgs")
    out = tmp_path / "m.safetensors"
    res = cli("finetune", "--arch", "convnet8", "--data", "imagefolder", "--data-dir", root, "--epochs", "1",
              "--eval-n", "4", "--device", "cpu", "-o", out)
    assert res.code == 0, res.stderr
    assert rcomp.load(out).meta.input.shape == (1, 10, 12)
    assert "input shape 1x10x12" in res.stderr and "held-out" in res.stderr


def test_quantize_needs_data_when_the_checkpoint_records_none(cli, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")  # records no dataset
    res = cli("quantize", ckpt, "-o", tmp_path / "q.safetensors")
    assert_one_line_error(res, "records no dataset", "--data")


def test_trades_from_a_trained_checkpoint_keeps_the_model(cli, trained_digits, tmp_path):
    out = tmp_path / "t.safetensors"
    res = cli("finetune", trained_digits, "--data", "digits", "--adv", "trades", "--eps", "0.1", "--epochs", "2",
              "-n", "400", "--eval-n", "200", "--device", "cpu", "--json", "-o", out)
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    # The claim is that TRADES keeps the model (beta 6 collapsed it to chance, 0.1): clean test accuracy stays
    # far above chance and training accuracy near the start (0.96). Measured over seeds 0-2 on one CPU: test
    # 0.80-0.96, last-epoch training 0.905-0.97. The bound used to be "> 0.8", which seed 0 meets exactly on
    # one CPU and misses on another (float kernels differ), so it failed by machine, not by behaviour.
    assert report["test_clean_acc"] >= 0.7, report
    assert all(e["train_acc"] >= 0.85 for e in report["epochs"]), report["epochs"]


def test_finetune_of_int8_reports_its_real_parameter_count(cli, trained_digits, tmp_path):
    q = tmp_path / "q.safetensors"
    assert cli("quantize", trained_digits, "--data", "digits", "--calib-n", "64", "--eval-n", "0", "-o", q).code == 0
    res = cli("finetune", q, "--data", "digits", "--epochs", "1", "-n", "64", "--eval-n", "0", "--device", "cpu",
              "-o", tmp_path / "f.safetensors")
    assert res.code == 0, res.stderr
    assert " 0 parameters" not in res.stderr and "parameters" in res.stderr


def test_a_pytorch_file_is_named_before_the_output(cli, tmp_path):
    src = tmp_path / "r18.pth"
    torch.save({"w": torch.zeros(2)}, src)
    (tmp_path / "r18.prune0.5.safetensors").write_bytes(b"existing")
    assert_one_line_error(cli("prune", src, "--ratio", "0.5"), "rcomp convert")


def test_bench_tells_same_named_files_apart_and_reports_latency_spread(cli, tiny_ckpt, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(tiny_ckpt, tmp_path / "a" / "base.safetensors")
    shutil.copy(tiny_ckpt, tmp_path / "b" / "base.safetensors")
    res = cli("bench", tmp_path / "a" / "base.safetensors", tmp_path / "b" / "base.safetensors", "--data", "digits",
              "-n", "8", "--format", "json", "--latency-batch", "0", "--device", "cpu")
    assert res.code == 0, res.stderr
    models = json.loads(res.stdout)["models"]
    assert [m["name"] for m in models] == ["a/base.safetensors", "b/base.safetensors"]
    lat = models[0]["latency"]["1"]
    assert lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"] and lat["reps"] == 10 and "steady" in lat


def test_rcomp_run_prints_the_bench_table(cli, tiny_ckpt, tmp_path):
    import yaml

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"name": "b", "stages": [
        {"name": "bench", "command": "bench", "inputs": [str(tiny_ckpt)], "output": "bench.json",
         "options": {"data": "digits", "n": 8, "format": "json", "latency-batch": 0, "device": "cpu"}}]}))
    res = cli("run", rec, "--out-dir", tmp_path / "out")
    assert res.code == 0, res.stderr
    assert "clean %" in res.stdout and "tiny.safetensors" in res.stdout


@pytest.mark.parametrize("args,lines", [
    ([], ["  rcomp prune model.safetensors --ratio 0.5 | rcomp finetune --data digits --adv pgd --eps 0.1 \\",
          "    | rcomp bench --data digits --attack fgsm,pgd --eps 0.1"]),
    (["convert"], ["  rcomp convert cifar_weights.safetensors --arch resnet18-cifar --mean 0.4914,0.4822,0.4465 \\",
                   "    --std 0.2470,0.2435,0.2616 --dataset cifar10"]),
    (["finetune"], ["  rcomp finetune model.safetensors --data cifar10 --adv fgsm --eps 8/255 --schedule onecycle \\"]),
])
def test_help_examples_are_verbatim(cli, args, lines):
    out = [ln.strip() for ln in cli(*args, "--help").stdout.splitlines()]
    for line in lines:
        assert line.strip() in out, (line, out)


def test_library_warnings_do_not_leak(tmp_path):
    """torchvision's FutureWarning on building googlenet reaches the user without rcomp's filter.

    A real process (what a user runs) without --debug shows no warning; the check can fail, since with
    --debug (in-process, every warning shown each time) the FutureWarning is there. The subprocess's
    timeout only guards against a hang: on a loaded machine it used to be 120 s and was exceeded."""
    import subprocess
    import sys
    import warnings

    import torchvision

    from conftest import run_cli

    src = tmp_path / "g.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torchvision.models.googlenet(num_classes=10, init_weights=False).state_dict(), src)
    args = ["convert", str(src), "--arch", "googlenet", "--normalize", "imagenet", "--input-shape", "3,64,64"]
    res = subprocess.run([sys.executable, "-m", "rcomp", *args, "-o", str(tmp_path / "g.safetensors")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # as Python's default hook does (pytest records warnings instead): to stderr, which run_cli captures
        warnings.showwarning = lambda msg, cat, fn, ln, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(msg, cat, fn, ln, line))
        debug = run_cli(*args, "-o", tmp_path / "h.safetensors", "--debug")
    assert debug.code == 0, debug.stderr
    assert "FutureWarning" in debug.stderr  # the check can fail: --debug shows them


def test_budget_as_a_fraction_of_a_reference_runs_cost(cli, tmp_path):
    """--budget-of REF --budget-fraction F trains the steps that cost F of REF's recorded training."""
    ref = tmp_path / "ref.safetensors"
    res = cli("finetune", "--arch", "convnet8", "--data", "digits", "--adv", "pgd", "--eps", "0.1", "--steps", "3",
              "--epochs", "1", "-n", "256", "--batch-size", "64", "--eval-n", "0", "--device", "cpu", "-o", ref)
    assert res.code == 0, res.stderr  # 4 steps x (1 + 3) = 16 passes
    out = tmp_path / "ft.safetensors"
    res = cli("finetune", ref, "--data", "digits", "--budget-of", ref, "--budget-fraction", "0.5", "--epochs", "5",
              "-n", "256", "--batch-size", "64", "--eval-n", "0", "--device", "cpu", "-o", out)
    assert res.code == 0, res.stderr
    last = rcomp.load(out).meta.history[-1]
    assert last["metrics"]["steps"] == 8 and last["params"]["budget_fraction"] == 0.5  # 8 standard steps = 8 passes
    assert "budget: 8 steps" in res.stderr
    bad = cli("finetune", ref, "--data", "digits", "--budget-fraction", "0.5", "-o", tmp_path / "x.safetensors")
    assert_one_line_error(bad, "--budget-of")
