"""`rcomp demo`, the README's first command, end to end at tiny settings."""

from __future__ import annotations

import json

import pytest

from rcomp.models.loading import load


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, cli):
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--out-dir", out, "--set", "*.steps=2")
    assert res.code == 0, res.stderr[-3000:]
    # the report: table, conclusion with numbers, json, plot (matplotlib is in the dev extra)
    assert "## Conclusion" in res.stdout and "baseline-adv" in res.stdout
    report = json.loads((out / "report.json").read_text())
    stages = {m["stage"] for m in report["models"]}
    paths = ("pruned", "pruned-adv", "int8", "int4")
    budgeted = {f"{m}-ft-pgd-s{b}" for m in paths for b in (9, 36, 67, 90)}
    budgeted |= {f"{m}-ft-nfgsm-s{b}" for m in paths for b in (36, 144, 270, 360)}  # N-FGSM, matched passes
    assert stages == {"baseline", "baseline-adv", "pruned", "pruned-adv", "int8", "int4",
                      *budgeted, *{f"pruned-ft-none-s{b}" for b in (72, 288, 720)}}
    # the baselines and the largest budgets are judged by auto as well as PGD; the rest by PGD
    by = {m["stage"]: m for m in report["models"]}
    for s in ("baseline", "baseline-adv", "int4-ft-nfgsm-s270", "pruned-adv-ft-pgd-s90"):
        assert {"pgd", "apgd-ce", "apgd-t", "square"} <= set(by[s]["robust_acc"]), s
    assert set(by["pruned-ft-pgd-s9"]["robust_acc"]) == {"pgd"}
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
    # a second run skips every finished stage
    again = cli("demo", "--quick", "--out-dir", out, "--set", "*.steps=2", "--json")
    assert again.code == 0, again.stderr[-2000:]
    assert "skipped" in again.stderr and " ran" not in again.stderr.replace("up to date", "")
