"""finetune --save-at: one run writes the model at several step budgets; recipes name and stamp those files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import assert_one_line_error

FAST = ("--data", "digits", "-n", "256", "--batch-size", "64", "--eval-n", "0", "--eps", "0.1")


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_weights(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def _history(path: Path) -> list[dict]:
    from rcomp.io.describe import describe

    return describe(path)["history"]


@pytest.mark.parametrize("kind,adv", [("dense", ("--adv", "pgd", "--steps", "2")), ("int8", ("--adv", "n-fgsm"))])
def test_snapshots_equal_separate_runs_of_that_many_steps(tmp_path, cli, trained_digits, kind, adv):
    """The model after 3 of 8 steps is bit for bit a 3-step run's (const schedule; for int8 through the fake-quant
    twin and with the overfitting guard of N-FGSM watching), keeps the input's format, and records its own steps."""
    from rcomp.models.loading import load
    from rcomp.train.budget import history_cost, passes_per_step

    src = trained_digits
    if kind == "int8":
        src = tmp_path / "int8.safetensors"
        assert cli("quantize", trained_digits, "--data", "digits", "-o", src).code == 0
    long = cli("finetune", src, *FAST, *adv, "--steps-budget", "8", "--save-at", "5,3", "-o", tmp_path / "ft-s8.safetensors",
               "--json")
    assert long.code == 0, long.stderr[-2000:]
    report = json.loads(long.stdout)
    assert [(s["steps"], Path(s["path"]).name) for s in report["snapshots"]] == [(3, "ft-s3.safetensors"),
                                                                                 (5, "ft-s5.safetensors")]
    for n in (3, 5):
        alone = tmp_path / f"alone{n}.safetensors"
        res = cli("finetune", src, *FAST, *adv, "--steps-budget", str(n), "-o", alone)
        assert res.code == 0, res.stderr[-2000:]
        snap = tmp_path / f"ft-s{n}.safetensors"
        assert _same_weights(snap, alone), n
        last = _history(snap)[-1]
        assert last["metrics"]["steps"] == n and last["params"]["snapshot"] == {"steps": n, "of_steps": 8}
        per = passes_per_step(last["params"]["adv"], last["params"]["steps"])
        assert history_cost([last]) == n * per  # its cost is its own steps
        assert snap.name in long.stderr
    assert not _same_weights(tmp_path / "ft-s3.safetensors", tmp_path / "ft-s5.safetensors")
    if kind == "int8":
        assert load(tmp_path / "ft-s3.safetensors").meta.compression["quantization"]["mode"] == "int8"


@pytest.mark.parametrize("args,needle", [
    (("--steps-budget", "5", "--save-at", "5"), "below 5"),
    (("--steps-budget", "5", "--save-at", "2", "--allow-collapse"), "--allow-collapse"),
    (("--steps-budget", "5", "--save-at", "0"), "out of range"),
    (("--steps-budget", "5", "--save-at", "2,x"), "not an integer"),
    (("--epochs", "1", "--save-at", "9"), "below 4"),           # 256 images / 64: the run takes 4 steps
    (("--steps-budget", "5", "--save-at", "3", "-o", "{tmp}/m-s3.safetensors"), "the output"),
])
def test_save_at_refusals(tmp_path, cli, trained_digits, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "m.safetensors")]
    res = cli("finetune", trained_digits, *FAST, *args)
    assert_one_line_error(res, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_save_at_never_overwrites_a_file_without_force(tmp_path, cli, trained_digits):
    taken = tmp_path / "m-s2.safetensors"
    taken.write_bytes(b"mine")
    args = ("finetune", trained_digits, *FAST, "--steps-budget", "4", "--save-at", "2", "-o", tmp_path / "m.safetensors")
    assert_one_line_error(cli(*args), "m-s2.safetensors", "exists")
    assert taken.read_bytes() == b"mine" and not (tmp_path / "m.safetensors").exists()
    res = cli(*args, "--force")
    assert res.code == 0, res.stderr[-2000:]
    assert taken.read_bytes() != b"mine" and _history(taken)[-1]["metrics"]["steps"] == 2


@given(base=st.text("ab-s0189_.", min_size=1, max_size=12), tail=st.none() | st.integers(0, 10**4),
       a=st.integers(1, 10**6), b=st.integers(1, 10**6))
def test_snapshot_names(base, tail, a, b):
    from rcomp.stages.finetune import snapshot_path

    stem = f"x{base}" + (f"-s{tail}" if tail is not None else "")
    out = Path("d") / f"{stem}.safetensors"
    p = snapshot_path(out, a)
    assert p.parent == out.parent and p.name.endswith(f"-s{a}.safetensors")
    assert snapshot_path(p, b) == snapshot_path(out, b)  # the step count in the name is replaced, never stacked
    assert (p == out) == (stem.endswith(f"-s{a}") and p.name == out.name)


RECIPE = """
name: snaps
stages:
  - name: ft-s6
    command: finetune
    input: {src}
    options: {{data: digits, n: 256, batch-size: 64, eval-n: 0, steps-budget: 6, save-at: [2, 4], adv: none}}
  - name: pruned
    command: prune
    input: ft-s2
    options: {{ratio: 0.5}}
  - name: cmp
    command: bench
    inputs: ["ft-*"]
    options: {{n: 32, format: json, latency-batch: 0}}
    output: cmp.json
"""


def test_recipe_names_and_stamps_a_stages_snapshots(tmp_path, cli, trained_digits):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(src=trained_digits))
    out = tmp_path / "out"
    res = cli("run", recipe, "--out-dir", out)
    assert res.code == 0, res.stderr[-2000:]
    rows = json.loads((out / "cmp.json").read_text())["models"]
    assert [Path(m["path"]).name for m in rows] == ["ft-s2.safetensors", "ft-s4.safetensors", "ft-s6.safetensors"]
    assert _history(out / "pruned.safetensors")[-2]["metrics"]["steps"] == 2  # the prune read the 2-step snapshot
    stamp = json.loads((out / ".rcomp-run" / "ft-s6.json").read_text())
    assert set(stamp["extra_sha256"]) == {"ft-s2.safetensors", "ft-s4.safetensors"}
    again = cli("run", recipe, "--out-dir", out)
    assert again.code == 0 and again.stderr.count("up to date, skipped") == 3, again.stderr[-2000:]
    before = (out / "ft-s4.safetensors").read_bytes()
    (out / "ft-s4.safetensors").unlink()  # a missing snapshot runs its stage again
    third = cli("run", recipe, "--out-dir", out)
    assert third.code == 0, third.stderr[-2000:]
    assert "ft-s4.safetensors: its content is not what its last run wrote" in third.stderr
    assert "ft-s6: rcomp finetune" in third.stderr and "--save-at 2,4" in third.stderr
    import os

    if os.environ.get("SOURCE_DATE_EPOCH"):  # a reproducible run makes the same bytes, so its readers stay done
        assert (out / "ft-s4.safetensors").read_bytes() == before
    assert (out / "ft-s4.safetensors").exists()


def test_recipe_refuses_a_snapshot_named_like_a_stage(tmp_path, cli, trained_digits):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(src=trained_digits).replace("name: pruned", "name: ft-s4"))
    res = cli("run", recipe, "--out-dir", tmp_path / "out", "--dry-run")
    assert_one_line_error(res, "ft-s4", "rename")
