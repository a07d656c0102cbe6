"""Every example runs, at tiny sizes on digits, so examples never rot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rcomp.models.loading import load

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--set", "data=digits", "--set", "shape=1,8,8", "--set", "epochs_base=1", "--set", "epochs_ft=1",
        "--set", "n=24", "--set", "ratios=[0.5]", "--set", "bits=[4]", "--set", "*.steps=2",
        # training on 64 stratified images: resnet18-cifar at 1 torch thread took minutes on the full 1,437
        "--set", "baseline*.n=64", "--set", "*-ft-*.n=64"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["paper-fashion-mnist.yaml", "paper-cifar10.yaml"])
def test_paper_recipes_run_tiny(tmp_path, cli, recipe):
    out = tmp_path / "out"
    res = cli("run", EXAMPLES / recipe, "--out-dir", out, "--json", *TINY)
    assert res.code == 0, res.stderr[-2000:]
    stages = {s["stage"]: s for s in json.loads(res.stdout)["stages"]}
    assert {"baseline", "baseline-adv", "pruned-0.5", "int4", "pruned-0.5-ft-pgd", "int4-ft-none", "bench"} <= set(stages)
    bench = json.loads((out / "bench.json").read_text())
    assert len(bench["models"]) == 8 and bench["n"] == 24
    pruned = load(out / "pruned-0.5-ft-pgd.safetensors")
    assert [h["command"] for h in pruned.meta.history][-3:] == ["finetune", "prune", "finetune"]


@pytest.mark.slow
def test_robust_pruning_recipe_runs_tiny(tmp_path, cli):
    out = tmp_path / "out"
    res = cli("run", EXAMPLES / "robust-pruning.yaml", "--out-dir", out, "--json", "--set", "epochs_base=1",
              "--set", "n=16", "--set", "budgets=[2]", "--set", "pruned-hydra.score-steps=3",
              "--set", "bench.queries=20", "--set", "bench.targets=1")
    assert res.code == 0, res.stderr[-2000:]
    stages = {s["stage"] for s in json.loads(res.stdout)["stages"]}
    assert {"pruned-l1-ft-s2", "pruned-taylor-ft-s2", "pruned-hydra-ft-s2", "bench"} <= stages
    model = load(out / "pruned-hydra-ft-s2.safetensors")
    ft = model.meta.history[-1]
    assert ft["metrics"]["steps"] == 2 and model.meta.history[-2]["params"]["method"] == "hydra"
    bench = json.loads((out / "bench.json").read_text())
    assert bench["models"][0]["mode"] == "cascade" and len(bench["models"]) == 7


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_pipeline_and_ci_gate_scripts(tmp_path):
    if shutil.which("rcomp", path=_env()["PATH"]) is None:
        pytest.fail("the rcomp console script is not installed next to this Python")
    work = tmp_path / "work"
    env = {**_env(), "EPOCHS": "2"}
    res = subprocess.run(["bash", str(EXAMPLES / "pipeline.sh"), str(work)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "robust.safetensors" in res.stdout and "robust-int8.safetensors" in res.stdout  # the bench table
    assert (work / "robust.safetensors").exists()
    # the gate: impossible thresholds fail with exit 1 and name the metric; lenient ones pass
    gate = ["bash", str(EXAMPLES / "ci-gate.sh"), str(work / "robust.safetensors"), "digits", "0.1"]
    strict = subprocess.run(gate, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**_env(), "N": "40", "CLEAN": "0", "PGD": "1", "WORST": "0"})
    assert strict.returncode == 1, strict.stderr[-2000:]
    assert "pgd" in strict.stderr
    lenient = subprocess.run(gate, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                             env={**_env(), "N": "40", "CLEAN": "0", "PGD": "0", "WORST": "0"})
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    assert json.loads((tmp_path / "bench-report.json").read_text())["n"] == 40


def test_workflow_snippet_uses_real_options(cli):
    """The CI snippet's rcomp lines parse: every option it uses exists."""
    text = (EXAMPLES / "github-workflow.yml").read_text()
    for cmd in ("prune", "finetune", "bench"):
        assert f"rcomp {cmd}" in text
    for opt in ("--ratio", "--adv", "--eps", "--epochs", "--attack", "--format", "--fail-under"):
        assert opt in text
        owner = {"--ratio": "prune", "--adv": "finetune", "--epochs": "finetune"}.get(opt, "bench")
        assert opt in cli(owner, "--help").stdout, opt
