"""`rcomp run`: recipes are checked before anything runs, run in order, and resume."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rcomp.models.builtin import MLP

from conftest import assert_one_line_error


@pytest.fixture
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    p = tmp_path / "w.safetensors"
    save_file(MLP(64, 10).state_dict(), str(p))
    return p


def _recipe(tmp_path, body: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(body))
    return p


def test_recipe_runs_and_resumes(tmp_path, weights, cli):
    r = _recipe(tmp_path, f"""
        name: t
        vars: {{shape: "1,8,8"}}
        stages:
          - name: conv-{{ds}}
            command: convert
            inputs: [{weights}]
            grid: {{ds: [digits, fake]}}
            options: {{arch: mlp, input-shape: "{{shape}}", dataset: "{{ds}}"}}
    """)
    out = tmp_path / "out"
    res = cli("run", r, "--out-dir", out, "--json")
    assert res.code == 0, res.stderr
    stages = json.loads(res.stdout)["stages"]
    assert [s["status"] for s in stages] == ["ran", "ran"]
    assert (out / "conv-digits.safetensors").exists() and (out / "conv-fake.safetensors").exists()
    res = cli("run", r, "--out-dir", out, "--json")
    assert [s["status"] for s in json.loads(res.stdout)["stages"]] == ["skipped", "skipped"]
    # a changed option re-runs only that stage's combinations
    res = cli("run", r, "--out-dir", out, "--json", "--set", "conv-fake.dataset=svhn")
    assert [s["status"] for s in json.loads(res.stdout)["stages"]] == ["skipped", "ran"]


@pytest.mark.parametrize("body,needle", [
    ("""
     stages:
       - name: a
         command: squash
     """, "line 3: unknown command 'squash'"),
    ("""
     stages:
       - name: a
         command: convert
         input: {w}
         options: {{arch: mlp, no-such-option: 1}}
     """, "command convert has no option --no-such-option"),
    ("""
     stages:
       - name: a
         command: convert
         input: missing-stage
         options: {{arch: mlp}}
     """, "line 3: input 'missing-stage'"),
    ("""
     stages:
       - name: a
         command: convert
         input: b
         options: {{arch: mlp}}
       - name: b
         command: convert
         input: a
         options: {{arch: mlp}}
     """, "cycle"),
    ("""
     stages:
       - name: a
         command: convert
         input: {w}
         options: {{arch: "{{nope}}"}}
     """, "unknown variable {nope}"),
    ("stages: [\n", "not valid YAML"),
])
def test_bad_recipe_fails_before_running(tmp_path, weights, cli, body, needle):
    r = _recipe(tmp_path, body.format(w=weights))
    out = tmp_path / "out"
    res = cli("run", r, "--out-dir", out)
    assert_one_line_error(res, needle)
    assert not out.exists()


def test_dry_run_prints_commands(tmp_path, weights, cli):
    r = _recipe(tmp_path, f"""
        stages:
          - name: a
            command: convert
            input: {weights}
            options: {{arch: mlp, input-shape: "1,8,8"}}
    """)
    res = cli("run", r, "--out-dir", tmp_path / "o", "--dry-run")
    assert res.code == 0, res.stderr
    assert res.stdout.startswith("rcomp convert ") and "--arch mlp" in res.stdout
    assert not (tmp_path / "o").exists()


def test_a_stage_writing_onnx_defaults_to_an_onnx_output_and_a_wrong_one_is_refused_before_anything_runs(
        tmp_path, weights, cli):
    body = f"""
        stages:
          - name: m
            command: convert
            input: {weights}
            options: {{arch: mlp, input-shape: "1,8,8"}}
          - name: x
            command: export
            input: m
          - name: xq
            command: quantize
            input: x
            options: {{backend: onnxruntime}}
    """
    res = cli("run", _recipe(tmp_path, body), "--out-dir", tmp_path / "o", "--dry-run")
    assert res.code == 0, res.stderr
    assert f"--output {tmp_path / 'o' / 'x.onnx'} " in res.stdout and f"--output {tmp_path / 'o' / 'xq.onnx'} " in res.stdout
    for stage in ("x", "xq"):  # an explicit output that is not .onnx: refused at the plan, naming the line
        bad = body.replace(f"  - name: {stage}\n", f"  - name: {stage}\n            output: {stage}.safetensors\n")
        res = cli("run", _recipe(tmp_path, bad), "--out-dir", tmp_path / "o")
        assert_one_line_error(res, "line", f"{stage}.safetensors must end in .onnx")
        assert not (tmp_path / "o").exists()


def test_demo_shows_its_recipe(cli):
    res = cli("demo", "--show-recipe")
    assert res.code == 0 and "stages:" in res.stdout and "baseline-adv" in res.stdout


def test_set_with_a_stage_pattern_overrides_the_stages_own_value(tmp_path):
    """README: `--set STAGE.OPTION=VALUE` overrides. A pattern (`*.steps`) used to lose silently to a
    stage's own `steps:`; now stage < pattern < exact name, and the pattern touches only stages whose
    command takes the option."""
    from rcomp.recipes.engine import Recipe, plan

    text = """
stages:
  - {name: a1, command: attack, input: {ckpt}, options: {data: digits, eps: 0.1, attack: pgd, steps: 7}}
  - {name: a2, command: attack, input: {ckpt}, options: {data: digits, eps: 0.1, attack: pgd, steps: 7}}
  - {name: p, command: prune, input: {ckpt}, options: {ratio: 0.5}}
"""
    from conftest import make_checkpoint

    out = tmp_path / "out"
    ckpt = tmp_path / "m.safetensors"
    make_checkpoint(ckpt)
    text = text.replace("{ckpt}", str(ckpt))

    def steps(overrides):
        st = {s.name: s for s in plan(Recipe(text, source="t.yaml", overrides=overrides), out)}
        assert not hasattr(st["p"].config, "steps")  # prune takes no --steps: the pattern skips it
        return st["a1"].config.steps, st["a2"].config.steps

    assert steps({}) == (7, 7)
    assert steps({"*.steps": "2"}) == (2, 2)
    assert steps({"*.steps": "2", "a2.steps": "3"}) == (2, 3)
    assert steps({"a*.steps": "4"}) == (4, 4)


def test_recipe_bench_stages_time_with_passive_threads(tmp_path):
    """`rcomp run` (like `rcomp bench`) sets OMP_WAIT_POLICY=PASSIVE before torch loads, unless the user set
    it: busy-waiting threads skew latency on a loaded machine; the bench report states the policy."""
    import json
    import os
    import subprocess
    import sys

    from conftest import make_checkpoint

    ckpt = tmp_path / "m.safetensors"
    make_checkpoint(ckpt)
    rec = tmp_path / "r.yaml"
    rec.write_text(f"stages:\n  - {{name: b, command: bench, inputs: [{ckpt}], output: b.json, "
                   "options: {data: digits, n: 16, attack: fgsm, eps: 0.1, format: json}}\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = "1"
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        out = tmp_path / f"out-{want}"
        e = env if given is None else {**env, "OMP_WAIT_POLICY": given}
        proc = subprocess.run([sys.executable, "-m", "rcomp", "run", str(rec), "--out-dir", str(out)], env=e,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((out / "b.json").read_text())["thread_policy"] == want


@pytest.mark.parametrize("options,needle", [
    ("{bits: 4, data: digits}", "--bits 4 is not supported without --simulate"),
    ("{simulate: true, bits: 4, backend: pt2e, data: digits}", "--backend pt2e makes real int8 models only"),
])
def test_options_that_do_not_go_together_name_the_stage_line(tmp_path, cli, options, needle):
    """Each option parsed, so the refusal came from the stage's own check without the recipe's file and line."""
    from conftest import assert_one_line_error, make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.safetensors", dataset="digits")
    r = _recipe(tmp_path, f"""
        stages:
          - name: q
            command: quantize
            input: {ckpt}
            options: {options}
        """)
    res = cli("run", r, "--out-dir", tmp_path / "out")
    assert_one_line_error(res, f"{r} line 3: {needle}")
    assert not (tmp_path / "out" / "q.safetensors").exists()
