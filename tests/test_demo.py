"""`rcomp demo`, the README's first command, end to end at tiny settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rcomp.models.loading import load


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, cli):
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--out-dir", out, "--set", "bench*.steps=2")
    assert res.code == 0, res.stderr[-3000:]
    # the report: table, conclusion with numbers, json, plot (matplotlib is in the dev extra)
    assert "## Conclusion" in res.stdout and "baseline-adv" in res.stdout
    report = json.loads((out / "report.json").read_text())
    stages = {m["stage"] for m in report["models"]}
    paths = ("pruned", "pruned-adv", "int8", "int4")
    # the paths from the standard model to their 50%-total point, the one from the adversarial model to 50% own
    budgeted = {f"{m}-ft-pgd-s{b}" for m in paths for b in (9, 36, 67, *((90,) if m == "pruned-adv" else ()))}
    budgeted |= {f"{m}-ft-nfgsm-s{b}" for m in paths  # N-FGSM, matched passes
                 for b in (36, 144, 270, *((360,) if m == "pruned-adv" else ()))}
    assert stages == {"baseline", "baseline-adv", "pruned", "pruned-adv", "int8", "int4",
                      *budgeted, *{f"pruned-ft-none-s{b}" for b in (72, 288, 540)}}
    # auto judges the baselines and, per path, the more robust by PGD (bench.json) of its two methods' 50%
    # points (chosen at run time, said on stderr); every other checkpoint has PGD alone
    by = {m["stage"]: m for m in report["models"]}
    pgd = {Path(m["path"]).stem: m["worst_case_acc"] for m in json.loads((out / "bench.json").read_text())["models"]}
    auto = {"pgd", "apgd-ce", "apgd-t", "square"}
    judged = {s for s, m in by.items() if auto <= set(m["robust_acc"])}
    chosen = {max(pair, key=lambda s: (pgd[s], s == pair[0])) for pair in
              [(f"{m}-ft-pgd-s67", f"{m}-ft-nfgsm-s270") for m in paths[:1] + paths[2:]]
              + [("pruned-adv-ft-pgd-s90", "pruned-adv-ft-nfgsm-s360")]}
    assert judged == {"baseline", "baseline-adv", *chosen}
    assert all(set(m["robust_acc"]) == {"pgd"} for s, m in by.items() if s not in judged)
    assert res.stderr.count("bench-auto: best of ") == 4
    assert report["own_costs"]["pruned-ft-nfgsm-s36"] == report["own_costs"]["pruned-ft-pgd-s9"]  # matched
    # --quick is a smoke run: it says so and draws no conclusion (issue 16)
    assert report["smoke"] is True and report["findings"] == []
    assert "Smoke run" in res.stdout and "REACHED" not in res.stdout and "reaches" not in res.stdout
    assert "latency ms (batch 1/" in res.stdout and "![" in (out / "report.md").read_text()
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Conclusion" in (out / "report.md").read_text()
    assert all(report["costs"].get(s) for s in budgeted)  # every budget is costed from the history
    assert by["pruned"]["macs"] < by["baseline"]["macs"]
    assert by["int8"]["size_bytes"] < 0.5 * by["baseline"]["size_bytes"]
    assert load(out / "int8-ft-pgd-s9.safetensors").meta.compression["quantization"]["mode"] == "int8"
    # worst case never above any single attack's robust accuracy
    for m in report["models"]:
        assert m["worst_case_acc"] <= min(m["robust_acc"].values()) + 1e-12
    # the path to a shipped file: the study's 50%-total point exported, made int8 by ONNX Runtime, benched beside it
    ship = report["shipped"]
    shipped = max(("pruned-ft-pgd-s67", "pruned-ft-nfgsm-s270"), key=lambda s: (pgd[s], s.startswith("pruned-ft-pgd")))
    assert [r["file"] for r in ship["models"]] == [f"{shipped}.safetensors", "ship.onnx", "ship.int8.onnx"]
    ckpt, fp32, int8 = ship["models"]
    assert set(fp32["robust_acc"]) == {"pgd", "square"} and fp32["gradient_source"] != ckpt["gradient_source"]
    assert abs(fp32["clean_acc"] - ckpt["clean_acc"]) <= 1 / 64 and int8["size_bytes"] < 0.5 * fp32["size_bytes"]
    assert "## The shipped file" in res.stdout and "ship.int8.onnx" in (out / "report.md").read_text()
    # a second run skips every finished stage
    again = cli("demo", "--quick", "--out-dir", out, "--set", "bench*.steps=2", "--json")
    assert again.code == 0, again.stderr[-2000:]
    assert "skipped" in again.stderr and " ran" not in again.stderr.replace("up to date", "")


def test_demo_without_the_onnx_extra_skips_only_the_shipped_file_stages(monkeypatch, tmp_path):
    """No onnx/onnxruntime: the demo says on stderr which extra to install and drops export, the ORT int8 and
    the bench that reads them; every other stage stays (no training here)."""
    from rcomp.cli.demo import QUICK, demo_recipe_text, skip_onnx_stages
    from rcomp.recipes.engine import Recipe

    full = [st.name for st in Recipe(demo_recipe_text(), overrides=QUICK).stages]
    assert {"ship", "ship-int8", "bench-ship"} <= set(full)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    recipe, said = Recipe(demo_recipe_text(), overrides=QUICK), []
    gone = skip_onnx_stages(recipe, said.append)
    assert gone == ["ship", "ship-int8", "bench-ship"]
    assert [st.name for st in recipe.stages] == [n for n in full if n not in gone]
    assert len(said) == 1 and "onnxruntime" in said[0] and "pip install 'rcomp[onnx]'" in said[0]
    assert "skipping stages ship, ship-int8, bench-ship" in said[0]
    from rcomp.recipes.engine import plan

    left = {st.name for st in recipe.stages}
    order = plan(recipe, tmp_path / "out")  # every input resolves: a stage, a file one writes (its snapshots), a glob
    assert {st.name for st in order} == left and not any(set(st.deps) & set(gone) for st in order)


def test_demo_with_the_onnx_extra_keeps_every_stage():
    from rcomp.cli.demo import demo_recipe_text, skip_onnx_stages
    from rcomp.recipes.engine import Recipe

    recipe, said = Recipe(demo_recipe_text()), []
    before = [st.name for st in recipe.stages]
    assert skip_onnx_stages(recipe, said.append) == [] and said == []
    assert [st.name for st in recipe.stages] == before


def test_recipe_without_drops_readers_transitively():
    from rcomp.recipes.engine import Recipe

    text = """
stages:
  - {name: a, command: finetune, options: {arch: convnet8}}
  - {name: b, command: prune, input: a, options: {ratio: 0.5}}
  - {name: c, command: quantize, input: b}
  - {name: d, command: prune, input: a, options: {ratio: 0.3}}
  - {name: e, command: bench, inputs: [a, c], output: e.json}
  - {name: f, command: bench, inputs: ["*"], output: f.json}
"""
    r = Recipe(text)
    assert r.without(["b"]) == ["b", "c", "e"]          # c reads b, e reads c; a glob reader (f) stays
    assert [st.name for st in r.stages] == ["a", "d", "f"]
    assert Recipe(text).without([]) == []
