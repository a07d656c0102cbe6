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
    unsettled_choices,
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


def _demo_like():
    """The demo's shape: paths from the standard model (12.5% sunk) at own budgets 5/20/50%, PGD and N-FGSM,
    and the pruned-adv path (100% sunk); baselines judged by pgd+auto, the largest budgets too."""
    rows, costs, own = [_row("baseline", 0.4, 0.97), _row("baseline-adv", 0.80, 0.97)], {}, {}
    costs.update({"baseline": 180.0, "baseline-adv": BASE_COST})
    for r in rows:
        r["robust_acc"] = {"pgd": r["worst_case_acc"], "apgd-ce": r["worst_case_acc"]}
    for start, sunk in (("pruned", 180.0), ("int8", 180.0), ("pruned-adv", BASE_COST)):
        rows.append(_row(start, 0.3))
        for method, per, budgets in (("pgd", 8, (9, 36, 90)), ("nfgsm", 2, (36, 144, 360))):
            for i, b in enumerate(budgets):
                stage = f"{start}-ft-{method}-s{b}"
                r = _row(stage, 0.6 + 0.1 * i + (0.02 if method == "nfgsm" else 0))
                if i == 2:  # the largest budget is judged again by auto
                    r["robust_acc"]["apgd-ce"] = r["worst_case_acc"]
                else:
                    r["robust_acc"] = {"pgd": r["worst_case_acc"]}
                rows.append(r)
                own[stage] = b * per
                costs[stage] = sunk + b * per
    return rows, costs, own


def test_plot_data_comes_from_the_table_numbers():
    """Issue 26: the plot's budget line and points, and the points of its inference panel, are the table's
    and the conclusion's own numbers; no two series of a panel share a marker."""
    from rcomp.recipes.report import MAX_BUDGET, _table, plot_data

    rows, costs, own = _demo_like()
    data = plot_data(rows, costs, own)
    _, table = _table(rows, ["pgd", "apgd-ce"], costs, BASE_COST, own)
    printed = {t[0]: (t[-2], t[-1]) for t in table}  # total, own columns as the table prints them
    assert set(data["training"]) == {"total", "own"}
    for col, panel in enumerate(("total", "own")):
        assert data["training"][panel]["limit"] == MAX_BUDGET
        n = 0
        for pts in data["training"][panel]["series"].values():
            for x, y, stage in pts:
                assert f"{x:.1%}" == printed[stage][col]
                assert y == next(r["worst_case_acc"] for r in rows if r["stage"] == stage)
                n += 1
        assert n == 18
    # the point the table puts at 50% own sits on the own panel's 50% line (and at 62.5% on the total one)
    own_pts = {s: x for pts in data["training"]["own"]["series"].values() for x, _, s in pts}
    tot_pts = {s: x for pts in data["training"]["total"]["series"].values() for x, _, s in pts}
    assert printed["pruned-ft-pgd-s90"] == ("62.5%", "50.0%")
    assert own_pts["pruned-ft-pgd-s90"] == pytest.approx(MAX_BUDGET) and tot_pts["pruned-ft-pgd-s90"] == 0.625
    # the inference panel shows, per path, the very point the total-accounting verdict quotes
    c = conclude(rows, costs, own_costs=own)
    quoted = {f["stage"] for f in c["findings"] if f["accounting"] == "total"}
    shown = {s for s, _, _ in data["inference"] if path_of(s)[1] is not None}
    assert shown == quoted and len(quoted) == 6
    for panel in data["styles"].values():
        styles = list(panel.values())
        assert len({m for m, _ in styles}) == len(styles)  # distinct markers (at most 15 series here)


def test_points_judged_by_fewer_attacks_cannot_reach():
    """A PGD-only point above the target is an upper bound: no success is claimed on it."""
    rows, costs, own = _demo_like()
    for r in rows:
        if r["stage"] == "pruned-ft-pgd-s36":
            r["worst_case_acc"] = r["robust_acc"]["pgd"] = 0.99   # PGD only, at 32.5% total
    c = conclude(rows, costs, own_costs=own)
    f = {(x["path"], x["accounting"]): x for x in c["findings"]}
    assert not f[("pruned-ft-pgd", "total")]["reached"]
    assert f[("pruned-ft-pgd", "own")]["reached"] and f[("pruned-ft-pgd", "own")]["stage"] == "pruned-ft-pgd-s90"
    # own accounting: pruned-adv's 50% own point reaches (0.8 >= 0.76); in total it costs 150%
    assert f[("pruned-adv-ft-pgd", "own")]["reached"] and not f[("pruned-adv-ft-pgd", "total")]["reached"]
    assert "Own accounting" in c["text"]


@pytest.mark.parametrize("other_worst,other_attacks,unsettled", [
    (0.625, ("pgd",), True),          # judged by fewer attacks and reads at least as robust: unknown which is better
    (0.622, ("pgd",), True),          # a tie counts: the left-out one's lower figure is unknown
    (0.600, ("pgd",), False),         # its upper bound is already below the chosen one's figure
    (0.700, ("pgd", "apgd"), False),  # judged by the same attacks: the figures compare
])
def test_a_choice_the_first_bench_could_not_settle_is_said(tmp_path, other_worst, other_attacks, unsettled):
    chosen = _row("int4-ft-nfgsm-s270", 0.622)
    other = {**_row("int4-ft-pgd-s67", other_worst), "robust_acc": {a: other_worst for a in other_attacks}}
    rows, costs = _table({})
    rows += [chosen, other]
    records = [{"stage": "bench-auto", "choices": [{"by": "bench", "chosen": "int4-ft-nfgsm-s270",
                                                    "figures": {"int4-ft-pgd-s67": 0.63, "int4-ft-nfgsm-s270": 0.77}}]}]
    found = unsettled_choices(rows, records)
    assert [(u["other"], u["chosen"]) for u in found] == ([("int4-ft-pgd-s67", "int4-ft-nfgsm-s270")] if unsettled else [])
    bench = {"data": "digits", "n": 360, "attacks": {"pgd": {}, "apgd": {}}, "models": rows}
    report = build_report(bench, records, tmp_path, plot=False, costs=costs, own_costs=costs)
    said = "Choices the first bench could not settle" in report["conclusion"]
    assert said is unsettled and report["unsettled_choices"] == found
    if unsettled:
        assert f"int4-ft-pgd-s67 (pgd only: {other_worst:.4f}, an upper bound)" in report["markdown"]
