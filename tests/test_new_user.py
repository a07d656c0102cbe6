"""Silent wrong numbers, round 2 (issue 26), end to end: subsets are stratified samples of the whole split,
every command resolves --data one way, stage functions never change their input, convert checks its input
spec against the data; and the smaller things found on the way (--config merging, info's number
formatting, image-folder errors before loading, shell completion, truthful training logs)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rcomp

from conftest import assert_one_line_error, make_checkpoint

QUIET = {"log": lambda s: None}
SEED = 0  # rcomp.data.subset.SUBSET_SEED: fixed, whatever --seed says


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """digits as a class-sorted image folder: test/ holds the 360 test images, train/ 4 per class."""
    from PIL import Image

    from rcomp.data.registry import get_dataset
    from rcomp.spec import InputSpec

    root = tmp_path_factory.mktemp("digits_folder")
    spec = InputSpec(1, 8, 8, mean=[0.0], std=[1.0])
    for split, per_class in (("test", None), ("train", 4)):
        ds = get_dataset("digits", split, spec)
        seen: dict[int, int] = {}
        for i in range(len(ds)):
            x, y = ds[i]
            y = int(y)
            if per_class is not None and seen.get(y, 0) >= per_class:
                continue
            seen[y] = seen.get(y, 0) + 1
            (root / split / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[0] * 255).round().to(torch.uint8).numpy(), mode="L").save(
                root / split / str(y) / f"{i:04d}.png")
    return root


@pytest.fixture
def fake_ckpt(tmp_path):
    """A random convnet8 that records the dataset ``fake`` (3x32x32)."""
    return make_checkpoint(tmp_path / "fake.safetensors", shape=(3, 32, 32), dataset="fake")


def _json(res):
    assert res.code == 0, res.stderr
    return json.loads(res.stdout)


# ----------------------------------------------------------------------------- 1. subsets

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=300), st.integers(1, 400))
def test_stratified_indices_give_each_class_its_share(labels, n):
    from rcomp.data.subset import stratified_indices

    idx = stratified_indices(labels, n)
    total = len(labels)
    assert len(idx) == min(n, total) and idx == sorted(set(idx)) and all(0 <= i < total for i in idx)
    assert idx == stratified_indices(labels, n)  # fixed seed: the same points every time
    k = len(idx)
    for c in set(labels):
        share = k * labels.count(c) / total
        got = sum(labels[i] == c for i in idx)
        assert math.floor(share) <= got <= math.ceil(share), (c, got, share)


def test_subset_seed_is_fixed_and_independent_of_the_run_seed(cli, trained_digits, tiny_ckpt):
    base = ["--data", "digits", "-n", "50", "--attack", "fgsm", "--eps", "0.1", "--json"]
    a = _json(cli("attack", trained_digits, *base, "--seed", "1"))
    b = _json(cli("attack", tiny_ckpt, *base, "--seed", "7"))
    assert a["points"] == b["points"] and a["points"]["seed"] == SEED
    assert a["points"]["sampling"] == "stratified" and sum(a["points"]["per_class"]) == 50


def test_bench_n_on_a_class_sorted_folder_is_a_stratified_sample(cli, trained_digits, digits_folder):
    """bench -n 100 used to take classes 0-2 only (1.000 against 0.961 on all 360 images)."""
    args = ["--data", "imagefolder", "--data-dir", digits_folder, "--format", "json", "--latency-batch", "0"]
    full = _json(cli("bench", trained_digits, *args))
    part = _json(cli("bench", trained_digits, *args, "-n", "100"))
    assert full["n"] == 360 and part["n"] == 100
    pts = part["points"]
    assert pts["sampling"] == "stratified" and pts["seed"] == SEED and pts["of"] == 360
    whole = full["points"]["per_class"]  # the digits test split is not balanced: 27 to 44 a class
    assert full["points"]["sampling"] == "all" and sum(whole) == 360 and len(pts["per_class"]) == 10
    for got, of in zip(pts["per_class"], whole, strict=True):
        assert math.floor(100 * of / 360) <= got <= math.ceil(100 * of / 360), (pts, whole)
    p = full["models"][0]["clean_acc"]
    sd = math.sqrt(p * (1 - p) / 100 * (1 - 100 / 360))  # finite-population sampling error
    assert abs(part["models"][0]["clean_acc"] - p) <= 3 * sd + 0.01, (part["models"][0]["clean_acc"], p)
    text = cli("bench", trained_digits, *args[:-4], "-n", "100", "--latency-batch", "0")
    assert text.code == 0 and "100 of 360 points (stratified sample, subset seed 0; per class" in text.stdout
    # the API picks the same points
    api = rcomp.bench([trained_digits], data="imagefolder", data_dir=digits_folder, n=100, latency_batch=0,
                      **QUIET).report
    assert api["points"] == pts and api["models"][0]["clean_acc"] == part["models"][0]["clean_acc"]


def test_finetune_n_and_eval_n_sample_every_class(cli, digits_folder, tmp_path):
    """finetune -n 256 used to train on classes 0 and 1 only, --eval-n 100 to cover classes 0-2."""
    out = tmp_path / "f.safetensors"
    res = cli("finetune", "--arch", "convnet8", "--data", "imagefolder", "--data-dir", digits_folder, "-n", "20",
              "--epochs", "1", "--batch-size", "10", "--eval-n", "30", "-o", out)
    assert res.code == 0, res.stderr
    assert "training on 20 of 40 points (stratified sample, subset seed 0; per class 2,2,2,2,2,2,2,2,2,2)" in res.stderr
    m = rcomp.load(out).meta.history[-1]["metrics"]
    assert m["train_points"]["per_class"] == [2] * 10
    assert sum(m["test_points"]["per_class"]) == m["test_n"] == 30 and min(m["test_points"]["per_class"]) >= 2
    net = rcomp.finetune(arch="convnet8", data="imagefolder", data_dir=digits_folder, n=20, epochs=1, batch_size=10,
                         eval_n=30, **QUIET).model
    assert net.meta.history[-1]["metrics"]["train_points"] == m["train_points"]


def test_replayed_examples_are_subsampled_by_the_same_rule(cli, trained_digits, tmp_path):
    adv = tmp_path / "adv.safetensors"
    assert cli("attack", trained_digits, "--data", "digits", "--attack", "fgsm", "--eps", "0.1", "-o", adv).code == 0
    rep = _json(cli("attack", trained_digits, "--from", adv, "-n", "50", "--json"))
    from rcomp.data.subset import choose

    direct = choose(rcomp.get_dataset("digits", "test", rcomp.load(trained_digits).meta.input), 50)[1]
    assert rep["n"] == 50 and rep["points"]["per_class"] == direct["per_class"]


# ----------------------------------------------------------------------------- 2. --data resolution

def test_finetune_uses_the_recorded_dataset_and_says_so(cli, fake_ckpt, tmp_path):
    """It trained on digits (the old default) while the checkpoint says fake: accuracy 0.06, exit 0."""
    out = tmp_path / "ft.safetensors"
    res = cli("finetune", fake_ckpt, "-n", "64", "--epochs", "1", "--batch-size", "32", "--eval-n", "32", "-o", out)
    assert res.code == 0, res.stderr
    assert f"data: fake (recorded in {fake_ckpt}; --data overrides)" in res.stderr
    model = rcomp.load(out)
    assert model.meta.dataset == "fake" and model.meta.history[-1]["params"]["data"] == "fake"
    tuned = rcomp.finetune(rcomp.load(fake_ckpt), n=64, epochs=1, batch_size=32, eval_n=0, **QUIET).model
    assert tuned.meta.history[-1]["params"]["data"] == "fake"


def test_every_command_resolves_data_the_same_way(cli, fake_ckpt, tiny_ckpt, tmp_path):
    rep = _json(cli("attack", fake_ckpt, "--attack", "fgsm", "--eps", "0.1", "-n", "20", "--json"))
    assert rep["data"] == "fake" and rep["n"] == 20
    res = cli("bench", fake_ckpt, "-n", "20", "--latency-batch", "0", "--format", "json")
    assert _json(res)["data"] == "fake" and "data: fake (recorded in" in res.stderr
    assert rcomp.attack(fake_ckpt, attack="fgsm", eps=0.1, n=20, **QUIET).report["data"] == "fake"
    res = cli("quantize", fake_ckpt, "--simulate", "--bits", "4", "--calib-n", "16", "--eval-n", "16",
              "-o", tmp_path / "q.safetensors")
    assert res.code == 0 and "data: fake (recorded in" in res.stderr
    # nothing recorded, nothing given: one clear refusal from every command
    for args in (["finetune", tiny_ckpt, "--epochs", "1"], ["attack", tiny_ckpt, "--attack", "fgsm", "--eps", "0.1"],
                 ["bench", tiny_ckpt], ["quantize", tiny_ckpt],
                 ["prune", tiny_ckpt, "--ratio", "0.5", "--method", "taylor"]):
        assert_one_line_error(cli(*args), "records no dataset; give --data")
    assert_one_line_error(cli("finetune", "--arch", "convnet8", "-o", tmp_path / "x.safetensors"),
                          "from scratch needs a dataset")
    assert_one_line_error(cli("bench", fake_ckpt, tiny_ckpt), "record different datasets", "give --data")
    with pytest.raises(rcomp.RcompError, match="records no dataset"):
        rcomp.finetune(rcomp.load(tiny_ckpt), epochs=1, **QUIET)


def test_imagefolder_mistakes_are_refused_before_the_model_loads(cli, tmp_path, digits_folder):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)  # loading it would fail with another message
    for cmd in (["attack", broken, "--attack", "fgsm", "--eps", "0.1"], ["bench", broken],
                ["finetune", broken], ["quantize", broken]):
        assert_one_line_error(cli(*cmd, "--data", "imagefolder"), "needs --data-dir")
        assert_one_line_error(cli(*cmd, "--data", "imagefolder", "--data-dir", digits_folder / "test" / "3"),
                              "one class's folder", str(digits_folder / "test"))


# ----------------------------------------------------------------------------- 3. the API never changes its input

def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, json.dumps(model.meta.history),
            sum(p.numel() for p in model.parameters()))


def test_api_stages_return_new_models_and_bench_names_each(trained_digits):
    m = rcomp.load(trained_digits)
    before = _snapshot(m)
    p = rcomp.prune(m, ratio=0.5, **QUIET).model
    ft = rcomp.finetune(m, data="digits", epochs=1, n=64, eval_n=0, **QUIET).model
    q = rcomp.quantize(m, data="digits", calib_n=32, eval_n=0, **QUIET).model
    for other in (p, ft, q):
        assert other is not m and other.meta is not m.meta
    sd, hist, params = _snapshot(m)
    assert hist == before[1] and params == before[2]
    assert all(torch.equal(sd[k], before[0][k]) for k in before[0])
    table = rcomp.bench([m, p, q, ft, p], data="digits", n=60, latency_batch=0, **QUIET).report
    names = [r["name"] for r in table["models"]]
    assert names == ["digits_convnet8.safetensors", "convnet8 prune[1]", "convnet8 quantize", "convnet8 finetune",
                     "convnet8 prune[4]"]
    rows = table["models"]
    assert rows[0]["params"] == params > rows[1]["params"] and rows[0]["path"] == str(trained_digits)
    assert rows[1]["path"] is None and rows[1]["sha256"] is None  # made in memory: not the file
    assert rows[0]["clean_acc"] > 0.5
    # a chain in memory records the right input: none for a model that is no file
    assert rcomp.finetune(p, epochs=1, n=32, eval_n=0, **QUIET).model.meta.history[-1]["input_sha256"] is None


def test_cli_bench_names_rows_by_file_and_leaves_inputs_alone(cli, trained_digits, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "m.safetensors").write_bytes(trained_digits.read_bytes())
    assert cli("prune", a / "m.safetensors", "--ratio", "0.5", "-o", b / "m.safetensors").code == 0
    res = _json(cli("bench", a / "m.safetensors", b / "m.safetensors", "-n", "20", "--latency-batch", "0",
                    "--format", "json"))
    assert [r["name"] for r in res["models"]] == ["a/m.safetensors", "b/m.safetensors"]
    assert (a / "m.safetensors").read_bytes() == trained_digits.read_bytes()


# ----------------------------------------------------------------------------- 4. convert checks the spec

@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("r18") / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), src)
    return src


def test_convert_refuses_a_default_shape_that_does_not_fit_the_data(cli, r18_weights, tmp_path):
    """It wrote a 3x224x224, ImageNet-normalised checkpoint for a model trained at 32x32."""
    out = tmp_path / "r.safetensors"
    res = cli("convert", r18_weights, "--arch", "resnet18", "--data", "cifar10", "--data-dir", tmp_path, "-o", out)
    assert_one_line_error(res, "default input shape 3x224x224", "cifar10's 3x32x32 images", "--input-shape 3,32,32")
    assert not out.exists()
    assert_one_line_error(cli("convert", r18_weights, "--arch", "resnet18", "--dataset", "digits", "-o", out),
                          "--input-shape 3,8,8")
    with pytest.raises(rcomp.RcompError, match="--input-shape 3,32,32"):
        rcomp.convert(r18_weights, arch="resnet18", data="cifar10", **QUIET)
    # a shape that fits passes the check (and is then measured: random weights are near chance)
    res = cli("convert", r18_weights, "--arch", "resnet18", "--input-shape", "3,8,8", "--normalize", "none",
              "--data", "digits", "-o", out)
    assert res.code == 2 and "near chance" in res.stderr and "input shape 3x224x224" not in res.stderr


# ----------------------------------------------------------------------------- also fixed on the way

def test_config_file_merges_top_level_and_section(cli, trained_digits, tmp_path):
    cfg = tmp_path / "c.yaml"
    # top-level data/latency-batch apply to bench, ratio (prune's) is skipped, the section wins per key
    cfg.write_text("data: fake\nratio: 0.5\nlatency-batch: 0\nn: 7\nbench:\n  data: digits\n  format: json\n")
    rep = _json(cli("bench", trained_digits, "--config", cfg))
    assert rep["data"] == "digits" and rep["n"] == 7 and list(rep["models"][0]["latency_ms"]) == ["1"]
    cfg.write_text("data: digits\nformat: json\nlatency-batch: 0\nn: 5\nattack: fgsm\neps: '0.1'\nprune:\n  ratio: 0.5\n")
    assert _json(cli("bench", trained_digits, "--config", cfg))["attacks"]["fgsm"]["eps"] == pytest.approx(0.1)
    cfg.write_text("data: digits\nno_such_option: 1\n")
    assert_one_line_error(cli("bench", trained_digits, "--config", cfg), "no option --no-such-option",
                          "nor does any other command")
    cfg.write_text("bench:\n  ratio: 0.5\n")
    assert_one_line_error(cli("bench", trained_digits, "--config", cfg), "command bench has no option --ratio")


def test_info_never_cuts_a_number(cli, tmp_path):
    rcomp.finetune(arch="convnet8", data="digits", epochs=1, n=32, eval_n=0, lr=0.003, output=tmp_path / "m.safetensors",
                   **QUIET)
    out = cli("info", tmp_path / "m.safetensors").stdout
    assert not re.search(r"lr=0(?![.\d])", out), out
    assert "lr=0.003" in out or "more)" in out


def test_finetune_logs_what_it_does(tmp_path):
    lines: list[str] = []
    m = rcomp.finetune(arch="convnet8", data="digits", epochs=1, n=64, eval_n=0, log=lines.append).model
    lines.clear()
    rcomp.finetune(m, epochs=60, steps_budget=3, n=64, batch_size=32, eval_n=0, log=lines.append)
    start = next(ln for ln in lines if ln.startswith("training the model"))
    assert "None" not in start and "from scratch" not in start and "60 epochs" not in start
    assert "for 3 optimizer steps (the budget: 2 epoch(s) of 2 steps)" in start


def test_shell_completion_is_available(cli):
    res = cli("--show-completion", "bash")
    assert res.code == 0 and "_rcomp_completion" in res.stdout
