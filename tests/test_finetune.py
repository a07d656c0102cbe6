"""`rcomp finetune` and rcomp.train: every mode, compression kept, determinism, resume, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import assert_one_line_error, make_checkpoint

FAST = ["--data", "digits", "--epochs", "1", "-n", "192", "--batch-size", "64", "--eval-n", "48"]


def _history(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["rcomp.history"])


def _same_run(a, b) -> bool:
    """Same tensors and same metadata, except the wall time the history records."""
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
        return False
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ma, mb = fa.metadata(), fb.metadata()
    ha, hb = json.loads(ma.pop("rcomp.history")), json.loads(mb.pop("rcomp.history"))
    for h in (ha, hb):
        h[-1]["metrics"].pop("wall_seconds", None)
    return ma == mb and ha == hb


def _net_tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("net.")}


@pytest.mark.parametrize("mode", ["none", "fgsm", "pgd", "trades"])
def test_every_mode_trains_and_records_history(cli, tiny_ckpt, tmp_path, mode):
    out = tmp_path / f"{mode}.safetensors"
    res = cli("finetune", tiny_ckpt, *FAST, "--adv", mode, "--eps", "0.1", "--steps", "2", "--val-split", "0.25",
              "-o", out)
    assert res.code == 0, res.stderr
    assert res.stdout.strip() == str(out)
    before, after = _net_tensors(tiny_ckpt), _net_tensors(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    h = _history(out)[-1]
    assert h["command"] == "finetune" and h["params"]["adv"] == mode
    ep = h["metrics"]["epochs"][0]
    assert 0 <= ep["val_clean_acc"] <= 1 and ep["loss"] > 0
    if mode != "none":
        assert 0 <= ep["val_robust_acc"] <= ep["val_clean_acc"]  # robust counts clean-correct points only
        assert 0 <= h["metrics"]["test_robust_acc"] <= h["metrics"]["test_clean_acc"]
        assert h["params"]["eps"] == pytest.approx(0.1)
    assert "epoch" in res.stderr  # progress and summary on stderr


def test_from_arch_same_seed_is_bit_identical(cli, tmp_path):
    args = ["finetune", "--arch", "convnet8", *FAST, "--adv", "fgsm", "--eps", "0.1", "--augment"]
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    assert cli(*args, "--seed", "3", "-o", a).code == 0
    assert cli(*args, "--seed", "3", "-o", b).code == 0
    assert cli(*args, "--seed", "4", "-o", c).code == 0
    assert _same_run(a, b)
    assert not _same_run(a, c)
    with safe_open(str(a), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["rcomp.dataset"]) == "digits"
    assert json.loads(meta["rcomp.input"])["height"] == 8


def test_pruned_model_stays_pruned(cli, tmp_path):
    from torch import nn

    from rcomp.models.loading import load, save
    from rcomp.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("convnet8", 10, (1, 8, 8))
    f = model.net.features
    f[0], f[2] = nn.Conv2d(1, 12, 3, padding=1), nn.Conv2d(12, 20, 3, stride=2, padding=1)
    f[4] = nn.Conv2d(20, 64, 3, padding=1)
    src = tmp_path / "pruned.safetensors"
    save(model, src)
    out = tmp_path / "pruned.ft.safetensors"
    res = cli("finetune", src, *FAST, "--adv", "pgd", "--eps", "0.1", "--steps", "2", "-o", out)
    assert res.code == 0, res.stderr
    shapes_in = {k: tuple(v.shape) for k, v in load_file(str(src)).items()}
    shapes_out = {k: tuple(v.shape) for k, v in load_file(str(out)).items()}
    assert shapes_in == shapes_out
    assert shapes_out["net.features.0.weight"] == (12, 1, 3, 3)
    loaded = load(out)
    assert loaded.net.features[2].out_channels == 20
    assert loaded(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_resume_equals_uninterrupted_and_ctrl_c_writes_nothing(cli, tiny_ckpt, tmp_path, monkeypatch):
    import rcomp.train.loop as loop

    args = ["finetune", tiny_ckpt, "--data", "digits", "--epochs", "3", "-n", "160", "--batch-size", "32",
            "--eval-n", "0", "--adv", "fgsm", "--eps", "0.1", "--optimizer", "adam", "--lr", "1e-3",
            "--schedule", "cosine", "--val-split", "0.2", "--save-every", "1"]
    full = tmp_path / "full.safetensors"
    assert cli(*args, "-o", full).code == 0

    real = loop._progress

    def interrupting(total, desc, on):
        if desc.startswith("epoch 3/"):
            raise KeyboardInterrupt
        return real(total, desc, on)

    part = tmp_path / "part.safetensors"
    monkeypatch.setattr(loop, "_progress", interrupting)
    res = cli(*args, "-o", part)
    assert res.code == 130 and res.stdout == ""
    assert not part.exists()
    state = tmp_path / "part.state.safetensors"
    assert state.exists()
    monkeypatch.setattr(loop, "_progress", real)
    res = cli(*args, "--resume", state, "-o", part)
    assert res.code == 0, res.stderr
    assert load_file(str(full)).keys() == load_file(str(part)).keys()
    for k, v in load_file(str(full)).items():
        assert torch.equal(v, load_file(str(part))[k]), k
    assert _history(full)[-1]["metrics"]["epochs"] == _history(part)[-1]["metrics"]["epochs"]
    assert _history(part)[-1]["params"]["resumed"] is True
    # a state from other options is refused
    bad = cli(*[a if a != "cosine" else "const" for a in args], "--resume", state, "-o", tmp_path / "x.safetensors")
    assert_one_line_error(bad, "different options", "schedule")


def test_state_file_has_no_pickle(tiny_ckpt, tmp_path):
    from rcomp.models.loading import load
    from rcomp.train.optim import make_optimizer
    from rcomp.train.state import load_state, restore, save_state

    model = load(tiny_ckpt)
    opt = make_optimizer(model.parameters(), "adam", 1e-3)
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "s.safetensors"
    save_state(path, model, opt, {"epoch": 1, "history": [{"epoch": 1}], "fingerprint": {}})
    raw = path.read_bytes()
    assert b"\x80\x04" not in raw[:64] and raw[8:9] == b"{"  # a safetensors JSON header, not a pickle
    info, tensors = load_state(path)
    fresh = load(tiny_ckpt)
    opt2 = make_optimizer(fresh.parameters(), "adam", 1e-3)
    restore(fresh, opt2, info, tensors, str(path))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


@pytest.mark.parametrize("args,needles", [
    (["--epochs", "0"], ["--epochs"]),
    (["--lr", "-0.1"], ["--lr"]),
    (["--adv", "madry"], ["--adv", "none, fgsm, n-fgsm, pgd, trades"]),
    (["--optimizer", "rmsprop"], ["--optimizer"]),
    (["--schedule", "linear"], ["--schedule"]),
    (["--eps", "2"], ["--eps"]),
    (["--val-split", "1.5"], ["--val-split"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--adv", "pgd", "--steps", "0"], ["--steps"]),
])
def test_bad_options_exit_2(cli, tiny_ckpt, tmp_path, args, needles):
    out = tmp_path / "o.safetensors"
    res = cli("finetune", tiny_ckpt, "--data", "digits", "-n", "32", "-o", out, *args)
    assert_one_line_error(res, *needles)
    assert not out.exists()


def test_refuses_existing_output_and_unknown_arch(cli, tiny_ckpt, tmp_path):
    out = make_checkpoint(tmp_path / "exists.safetensors")
    assert_one_line_error(cli("finetune", tiny_ckpt, "--data", "digits", "-o", out), "already exists")
    assert_one_line_error(cli("finetune", "--arch", "nonet", "--data", "digits", "-o", tmp_path / "n.safetensors"),
                          "unknown architecture")


def test_quantized_checkpoint_keeps_its_format(cli, trained_digits, tmp_path):
    qat = pytest.importorskip("rcomp.quant.qat")
    assert qat
    from rcomp.data.registry import get_dataset
    from rcomp.models.loading import load, save
    from rcomp.quant.ptq import quantize

    model = load(trained_digits)
    calib = [get_dataset("digits", "train", model.meta.input).images[:64]]
    q = quantize(model, calib, bits=4, simulate=True)
    src = tmp_path / "q4.safetensors"
    save(q, src)
    out = tmp_path / "q4.ft.safetensors"
    res = cli("finetune", src, *FAST, "-o", out)
    assert res.code == 0, res.stderr
    a, b = load(src), load(out)
    assert b.is_quantized
    assert a.meta.compression["quantization"]["bits"] == b.meta.compression["quantization"]["bits"] == 4
    assert load_file(str(src)).keys() == load_file(str(out)).keys()


# ---------------------------------------------------------------------------
# unit and property tests
# ---------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(schedule=st.sampled_from(["const", "step", "cosine", "onecycle"]), total=st.integers(1, 500),
       frac=st.floats(0, 1), warmup=st.integers(0, 50), base=st.floats(1e-5, 1.0))
def test_lr_schedule_stays_within_base(schedule, total, frac, warmup, base):
    from rcomp.train.optim import lr_at

    step = int(frac * (total - 1))
    lr = lr_at(step, total, base, schedule, warmup)
    assert 0 <= lr <= base * (1 + 1e-9)
    if schedule == "const" and step >= warmup:
        assert lr == base


@settings(max_examples=15, deadline=None)
@given(eps=st.floats(0.01, 0.3), mode=st.sampled_from(["fgsm", "pgd", "trades"]), norm=st.sampled_from(["linf", "l2"]),
       seed=st.integers(0, 10))
def test_training_adversary_stays_in_budget_and_leaves_no_param_grads(eps, mode, norm, seed):
    from rcomp.models.registry import build_model
    from rcomp.train.adversarial import AdvConfig, adversarial_examples

    torch.manual_seed(seed)
    model = build_model("mlp", 10, (1, 8, 8)).train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    cfg = AdvConfig(mode, eps, None, 2, norm).resolved()
    g = torch.Generator().manual_seed(seed)
    x_adv = adversarial_examples(model, x, y, cfg, g, seed)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())


def test_global_batches_shard_exactly():
    from rcomp.train.distributed import GlobalBatchSampler

    one = list(GlobalBatchSampler(103, 10, seed=5).batches(2))
    shards = [list(GlobalBatchSampler(103, 10, seed=5, rank=r, world=3).batches(2)) for r in range(3)]
    assert len(one) == 11 and all(len(s) == 11 for s in shards)
    for b, (idx, size, _) in enumerate(one):
        merged = sum((s[b][0] for s in shards), [])
        assert merged == idx and all(s[b][1] == size for s in shards)
    assert list(GlobalBatchSampler(103, 10, seed=5).batches(3))[0][0] != one[0][0]  # reshuffled per epoch
