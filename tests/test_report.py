"""The demo report (issues 16, 17): verdicts that match their own numbers, smoke runs, costs, plot."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rcomp.recipes.report import (
    TARGET_FRACTION,
    build_report,
    conclude,
    effective_size,
    path_of,
)


def _row(stage, worst, clean=0.95, macs=1_000_000, params=10_000, size=40_000, quant=None):
    return {"path": f"/x/{stage}.safetensors", "stage": stage, "params": params, "macs": macs, "size_bytes": size,
            "latency_ms": {"1": 0.5, "64": 3.0}, "clean_acc": clean, "robust_acc": {"pgd": worst, "apgd": worst},
            "worst_case_acc": worst, "quantization": quant, "quantized": False}


BASE_COST = 1440.0  # 180 steps of PGD-7 training


def _table(points: dict[str, list[tuple[int, float]]], ref=0.84):
    rows = [_row("baseline", 0.02, 0.99), _row("baseline-adv", ref, 0.97)]
    costs = {"baseline": 180.0, "baseline-adv": BASE_COST}
    for path, pts in points.items():
        for steps, worst in pts:
            rows.append(_row(f"{path}-s{steps}", worst))
            costs[f"{path}-s{steps}"] = steps * 8.0
    return rows, costs


def test_verdict_known_both_ways():
    rows, costs = _table({
        "pruned-ft-pgd": [(9, 0.70), (18, 0.80), (45, 0.83)],       # 0.80 >= 0.798 at 10%: reached
        "int4-ft-pgd": [(9, 0.60), (18, 0.7979), (100, 0.81)],      # 0.7979 rounds to 0.798 but misses
        "late-ft-pgd": [(9, 0.50), (135, 0.85)],                    # reaches only at 75%: not within 50%
    })
    c = conclude(rows, costs)
    f = {x["path"]: x for x in c["findings"]}
    assert f["pruned-ft-pgd"]["reached"] and f["pruned-ft-pgd"]["budget_fraction"] == pytest.approx(0.1)
    assert f["int4-ft-pgd"]["reached"] is False   # never round a miss into a success
    assert f["int4-ft-pgd"]["best_robust"] == 0.7979  # best within 50%
    assert f["late-ft-pgd"]["reached"] is False
    lines = {ln.split(":")[0][2:]: ln for ln in c["text"].splitlines() if ln.startswith("- ")}
    assert "reaches 95%" in lines["pruned-ft-pgd"] and "10.0% of the baseline's training cost" in lines["pruned-ft-pgd"]
    assert "does NOT reach" in lines["int4-ft-pgd"] and "0.7980" in lines["int4-ft-pgd"]
    assert "does NOT reach" in lines["late-ft-pgd"]
    assert "1 of 3 paths" in c["text"]


@settings(max_examples=60, deadline=None)
@given(ref=st.floats(0.1, 1.0), pts=st.lists(st.tuples(st.integers(1, 200), st.floats(0.0, 1.0)), min_size=1,
                                              max_size=6, unique_by=lambda t: t[0]))
def test_verdict_matches_numbers(ref, pts):
    rows, costs = _table({"p": pts}, ref=ref)
    f = conclude(rows, costs)["findings"][0]
    expected = any(s * 8.0 / BASE_COST <= 0.5 and w >= TARGET_FRACTION * ref for s, w in pts)
    assert f["reached"] == expected
    if expected:
        cheapest = min(s for s, w in pts if s * 8.0 / BASE_COST <= 0.5 and w >= TARGET_FRACTION * ref)
        assert f["budget_fraction"] == pytest.approx(cheapest * 8.0 / BASE_COST)


def test_smoke_run_draws_no_conclusion(tmp_path):
    rows, costs = _table({"pruned-ft-pgd": [(9, 0.9)]})
    bench = {"data": "digits", "n": 64, "attacks": {"pgd": {"eps": 0.1}}, "models": rows}
    rep = build_report(bench, [], tmp_path, smoke=True, costs=costs, plot=False)
    md = rep["markdown"]
    assert "Smoke run" in md and "no conclusion" in md.lower()
    assert "REACH" not in md.upper().replace("NO VERDICT", "") and "reaches" not in md
    assert rep["findings"] == []


def test_report_table_latency_batch_effective_size_and_embedded_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows, costs = _table({"pruned-ft-pgd": [(9, 0.7), (45, 0.82)], "int4-ft-pgd": [(9, 0.5)]})
    rows.append(_row("int4", 0.1, quant={"mode": "simulated", "bits": 4}, params=10_000, size=41_000))
    bench = {"data": "digits", "n": 360, "attacks": {"pgd": {"eps": 0.1}, "apgd": {"eps": 0.1}}, "models": rows,
             "device": "cpu", "threads": 2}
    rep = build_report(bench, [], tmp_path, costs=costs)
    md = (tmp_path / "report.md").read_text()
    assert "latency ms (batch 1/64)" in md
    assert "41 (5.0 at 4 bits)" in md  # stored 41 kB, 10,000 params x 4 bits = 5 kB
    assert "![" in md and "(tradeoff.png)" in md
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "0.6%" in md or "5.0%" in md  # train cost column: 9 steps x 8 / 1440 = 5.0%
    assert rep["findings"][0]["path"] == "pruned-ft-pgd"


def test_training_cost_counts_passes():
    from rcomp.train.budget import training_cost

    pgd = {"command": "finetune", "params": {"epochs": 15, "batch_size": 128, "adv": "pgd", "steps": 7}}
    assert training_cost(pgd) == 15 * 12 * 8           # 1437 images: 12 steps an epoch
    budget = {"params": {"epochs": 10, "batch_size": 128, "adv": "pgd", "steps": 7, "steps_budget": 45}}
    assert training_cost(budget) == 45 * 8
    taken = {"params": {"epochs": 10, "adv": "none", "steps_budget": 45}, "results": {"steps_taken": 30}}
    assert training_cost(taken) == 30
    assert training_cost({"params": {}}) is None


def test_helpers():
    assert path_of("pruned-ft-pgd-s45") == ("pruned-ft-pgd", 45)
    assert path_of("baseline-adv") == ("baseline-adv", None)
    assert effective_size({"params": 1000, "quantization": {"mode": "simulated", "bits": 4}}) == 500
    assert effective_size({"params": 1000, "quantization": {"mode": "int8", "bits": 8}}) is None


def test_older_recipe_single_points_are_judged_on_raw_numbers():
    rows = [_row("baseline-adv", 0.84), _row("pruned-ft-pgd", 0.7979), _row("int8-ft-pgd", 0.83)]
    f = {x["path"]: x["reached"] for x in conclude(rows)["findings"]}
    assert f == {"pruned-ft-pgd": False, "int8-ft-pgd": False}  # cost unknown: never claimed within 50%


def test_costs_count_the_training_of_the_starting_model(tmp_path):
    """A compressed model's cost includes the training of the model it came from; 'last only' does not."""
    import rcomp
    from rcomp.recipes.report import checkpoint_costs

    from conftest import make_checkpoint

    p = make_checkpoint(tmp_path / "m.safetensors")
    m = rcomp.load(p)
    m.meta.history += [
        {"command": "finetune", "params": {"adv": "pgd", "steps": 7, "epochs": 15}, "metrics": {"steps": 180}},
        {"command": "prune", "params": {"ratio": 0.5}, "metrics": {}},
        {"command": "finetune", "params": {"adv": "pgd", "steps": 7, "steps_budget": 9}, "metrics": {"steps": 9}},
    ]
    rcomp.save(m, tmp_path / "c.safetensors")
    rows = [{"stage": "c", "path": str(tmp_path / "c.safetensors")}]
    assert checkpoint_costs(rows) == {"c": (180 + 9) * 8.0}
    assert checkpoint_costs(rows, last_only=True) == {"c": 9 * 8.0}
