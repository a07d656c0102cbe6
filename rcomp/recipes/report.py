"""The demo's report: a side-by-side table, robustness-against-cost curves and a verdict per path.

The question (Thorsteinsson et al., arXiv 2403.09441): does a compressed model, adversarially
fine-tuned briefly, reach the robustness of an adversarially trained dense model at a fraction of
its cost? Costs are counted, not guessed: a training step costs ``1 + attack steps`` forward and
backward passes (PGD-7 training: 8), so every fine-tuning budget is stated as a fraction of the
adversarially trained baseline's training cost. A path *reaches* the baseline when its worst-case
robust accuracy is at least :data:`TARGET_FRACTION` of the baseline's, compared on the raw
numbers (a miss is never rounded into a success); the report gives the smallest budget at which
each path does so, or says that it does not within :data:`MAX_BUDGET` of the baseline's cost.

Stage names the report understands: ``baseline`` (standard dense), ``baseline-adv`` (the
reference), ``PATH-sN`` (path ``PATH`` fine-tuned for ``N`` steps, one point of a curve) and, from
older recipes, ``MODEL-ft-pgd`` (one point per path).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rcomp.train.budget import history_cost

#: a path reaches the baseline at this fraction of its worst-case robust accuracy
TARGET_FRACTION = 0.95
#: budgets are searched up to this fraction of the baseline's training cost
MAX_BUDGET = 0.5
#: the demo's digits training set (1,437 images): steps per epoch when a history gives epochs only
_BUDGET = re.compile(r"^(?P<path>.+)-s(?P<steps>\d+)$")
REFERENCE = "baseline-adv"


def _stage_of(path: str, records: list[dict]) -> str:
    for r in records:
        if Path(r.get("output", "")).name == Path(path).name:
            return r["stage"]
    return Path(path).stem


def path_of(stage: str) -> tuple[str, int | None]:
    """``("pruned-ft-pgd", 45)`` for ``pruned-ft-pgd-s45``; ``(stage, None)`` for a stage without a budget."""
    m = _BUDGET.match(stage)
    return (m["path"], int(m["steps"])) if m else (stage, None)


# ----------------------------------------------------------------------------- costs


def checkpoint_costs(rows: list[dict], last_only: bool = False) -> dict[str, float]:
    """``{stage: passes}`` of all the training in each checkpoint's history (header only): a compressed
    model's cost includes the training of the model it was made from. ``last_only``: the last run's."""
    from rcomp.io.format import CheckpointMeta
    from rcomp.io.header import read_header

    out = {}
    for r in rows:
        try:
            history = CheckpointMeta.from_metadata(read_header(r["path"]).metadata).history if r.get("path") else []
        except Exception:  # noqa: BLE001 - a cost we cannot read is shown as unknown
            continue
        if last_only:
            history = [h for h in history if h.get("command") == "finetune"][-1:]
        cost = history_cost(history)
        if cost is not None:
            out[r["stage"]] = cost
    return out


def effective_size(row: dict) -> float | None:
    """Bytes the weights would take at a *simulated* bit width (parameters x bits / 8); None otherwise."""
    q = row.get("quantization") or {}
    bits = q.get("bits")
    if q.get("mode") != "simulated" or not bits:
        return None
    return row["params"] * int(bits) / 8


def bit_ops(row: dict) -> float | None:
    """Bit-operations per image: MACs x weight bits x activation bits (32 x 32 for float models)."""
    if not row.get("macs"):
        return None
    q = row.get("quantization") or {}
    bits = int(q.get("bits") or (8 if row.get("quantized") else 32))
    return float(row["macs"]) * bits * bits


# ----------------------------------------------------------------------------- verdicts


def curves(rows: list[dict], costs: dict[str, float], ref_cost: float | None) -> dict[str, list[dict]]:
    """``{path: [{"stage", "steps", "fraction", "robust", "clean"}, ...]}`` sorted by cost fraction."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        path, steps = path_of(r["stage"])
        if steps is None:
            continue
        cost = costs.get(r["stage"])
        frac = cost / ref_cost if cost is not None and ref_cost else None
        out.setdefault(path, []).append({"stage": r["stage"], "steps": steps, "fraction": frac,
                                         "robust": r["worst_case_acc"], "clean": r["clean_acc"]})
    for pts in out.values():
        pts.sort(key=lambda p: (p["fraction"] is None, p["fraction"] or 0.0, p["steps"]))
    return out


def smallest_budget(points: list[dict], target: float, max_fraction: float = MAX_BUDGET) -> dict | None:
    """The cheapest point with ``robust >= target`` (raw numbers) at most ``max_fraction`` of the cost."""
    for p in points:
        if p["fraction"] is not None and p["fraction"] <= max_fraction + 1e-12 and p["robust"] >= target:
            return p
    return None


def _verdict_line(path: str, pts: list[dict], ref: float, target: float) -> tuple[dict, str]:
    hit = smallest_budget(pts, target)
    known = [p for p in pts if p["fraction"] is not None and p["fraction"] <= MAX_BUDGET + 1e-12]
    best = max(known or pts, key=lambda p: p["robust"])
    f = {"path": path, "reached": hit is not None, "budget_fraction": hit["fraction"] if hit else None,
         "robust": (hit or best)["robust"], "best_robust": best["robust"], "baseline_robust": ref,
         "target": target, "points": pts}
    if hit:
        text = (f"- {path}: reaches {TARGET_FRACTION:.0%} of the baseline's worst-case robust accuracy "
                f"({hit['robust']:.4f} >= {target:.4f}) at {hit['fraction']:.1%} of the baseline's training cost, "
                f"all training included ({hit['steps']} fine-tuning steps).")
    else:
        where = f" at {best['fraction']:.1%} of the cost" if best["fraction"] is not None else ""
        text = (f"- {path}: does NOT reach {TARGET_FRACTION:.0%} of the baseline's worst-case robust accuracy "
                f"within {MAX_BUDGET:.0%} of the baseline's training cost: best {best['robust']:.4f}{where}, "
                f"needed {target:.4f}" + _beyond(pts, target) + ".")
    return f, text


def _beyond(pts: list[dict], target: float) -> str:
    """Where a path reaches the target only above the budget limit, say at what cost."""
    over = [p for p in pts if p["fraction"] is not None and p["robust"] >= target]
    if not over:
        return ""
    p = min(over, key=lambda q: q["fraction"])
    return f"; it does at {p['fraction']:.1%} (its starting model's training counted)"


def _single_points(rows: list[dict]) -> dict[str, list[dict]]:
    """Older recipes: one ``MODEL-ft-pgd`` point per path, cost unknown."""
    return {r["stage"]: [{"stage": r["stage"], "steps": None, "fraction": None, "robust": r["worst_case_acc"],
                          "clean": r["clean_acc"]}] for r in rows if r["stage"].endswith("-ft-pgd")}


def conclude(rows: list[dict], costs: dict[str, float] | None = None, *, smoke: bool = False) -> dict[str, Any]:
    """Per path: the smallest budget reaching ``TARGET_FRACTION`` of the baseline's robustness, or a miss."""
    by = {r["stage"]: r for r in rows}
    base = by.get(REFERENCE)
    if smoke:
        return {"text": "SMOKE RUN (--quick): tiny training and few test points test that the chain works; "
                        "these numbers support no conclusion, so no verdict is drawn. Run without --quick for "
                        "the study.", "findings": [], "smoke": True}
    if base is None:
        return {"text": "No adversarially trained baseline in this run; nothing to compare against.", "findings": []}
    costs = costs or {}
    ref, ref_cost = base["worst_case_acc"], costs.get(REFERENCE)
    target = TARGET_FRACTION * ref
    paths = curves(rows, costs, ref_cost) or _single_points(rows)
    findings, lines = [], []
    for path, pts in paths.items():
        f, text = _verdict_line(path, pts, ref, target)
        findings.append(f)
        lines.append(text)
    n = sum(f["reached"] for f in findings)
    head = (f"Baseline (adversarially trained dense model): worst-case robust accuracy {ref:.4f}, so the target "
            f"is {target:.4f} ({TARGET_FRACTION:.0%}); costs count all the training that went into a model, "
            "the model it was compressed from included, as a fraction of the baseline's training cost"
            + (f" ({ref_cost:,.0f} forward+backward passes)" if ref_cost else " (unknown here)")
            + f". {n} of {len(findings)} paths reach the target within {MAX_BUDGET:.0%}.")
    dense = by.get("baseline")
    if dense is not None:
        head += (f" Standard dense model: clean {dense['clean_acc']:.4f}, worst-case robust "
                 f"{dense['worst_case_acc']:.4f}.")
    return {"text": "\n".join([head, *lines]), "findings": findings}


# ----------------------------------------------------------------------------- the report


def _table(rows: list[dict], attacks: list[str], costs: dict[str, float], ref_cost: float | None,
           ft_costs: dict[str, float] | None = None):
    batches = list(rows[0].get("latency_ms") or {}) if rows else []
    headers = ["checkpoint", "params", "MACs", "size kB (effective)",
               f"latency ms (batch {'/'.join(batches)})" if batches else "latency ms", "clean", *attacks,
               "worst", "total train cost", "of which last run"]
    table = []
    for r in rows:
        lat = r.get("latency_ms") or {}
        eff = effective_size(r)
        size = f"{(r.get('size_bytes') or 0) / 1000:.0f}" + (f" ({eff / 1000:.1f} at "
                                                             f"{r['quantization']['bits']} bits)" if eff else "")
        cost = costs.get(r["stage"])
        table.append([r["stage"], f"{r['params']:,}", f"{r['macs']:,}" if r.get("macs") else "-", size,
                      "/".join(f"{v:.2f}" for v in lat.values()) if lat else "-", f"{r['clean_acc']:.3f}",
                      *[f"{r['robust_acc'].get(a, float('nan')):.3f}" for a in attacks],
                      f"{r['worst_case_acc']:.3f}",
                      f"{cost / ref_cost:.1%}" if cost is not None and ref_cost else "-",
                      _frac((ft_costs or {}).get(r["stage"]), ref_cost)])
    return headers, table


def _frac(cost: float | None, ref: float | None) -> str:
    return f"{cost / ref:.1%}" if cost is not None and ref else "-"


def build_report(bench: dict[str, Any], records: list[dict], out_dir: Path, *, recipe_name: str = "demo",
                 plot: bool = True, smoke: bool = False, costs: dict[str, float] | None = None) -> dict[str, Any]:
    """Write report.json, report.md (with the plot embedded) and tradeoff.png into ``out_dir``.

    ``smoke``: a ``--quick`` run; the report says so and draws no conclusion. ``costs``:
    ``{stage: forward+backward passes}`` (default: read from each checkpoint's history)."""
    from tabulate import tabulate

    from rcomp.io.atomic import atomic_write_text

    out_dir = Path(out_dir)
    rows = [{**m, "stage": _stage_of(m["path"], records)} for m in bench["models"]]
    costs = dict(costs) if costs is not None else checkpoint_costs(rows)
    ref_cost = costs.get(REFERENCE)
    conclusion = conclude(rows, costs, smoke=smoke)
    report = {"recipe": recipe_name, "data": bench["data"], "n": bench["n"], "attacks": bench["attacks"],
              "device": bench.get("device"), "threads": bench.get("threads"), "models": rows, "smoke": smoke,
              "costs": costs, "conclusion": conclusion["text"], "findings": conclusion["findings"]}
    report["plot"] = make_plot(rows, costs, out_dir / "tradeoff.png") if plot else "plot skipped (--no-plot)"
    attacks = list(bench["attacks"])
    headers, table = _table(rows, attacks, costs, ref_cost, checkpoint_costs(rows, last_only=True))
    attack_desc = "; ".join(f"{k}: " + ", ".join(f"{pk}={pv}" for pk, pv in v.items() if pk != "name")
                            for k, v in bench["attacks"].items())
    md = [f"# rcomp {recipe_name} report", ""]
    if smoke:
        md += ["**Smoke run (--quick): no conclusions.**", ""]
    md += [f"Data: {bench['data']} ({bench['n']} test images); device {bench.get('device')}, "
           f"{bench.get('threads')} threads.", f"Attacks: {attack_desc}.", "",
           "Robust accuracy counts a point only if it is correct clean and under the attack; *worst* is the "
           "per-example worst case over all attacks. Quantized models are attacked through their gradient "
           "surrogate and scored on their real forward pass. *total train cost*: forward+backward passes of all "
           "the training behind a checkpoint (its starting model's included) as a fraction of the adversarially "
           "trained baseline's; *of which last run*: its own fine-tuning. Simulated quantization is "
           "stored in float; the effective size is parameters x bits / 8.", "",
           tabulate(table, headers=headers, tablefmt="github"), "",
           "## Conclusion", "", conclusion["text"], ""]
    md += [f"![robustness against training and inference cost]({Path(out_dir / 'tradeoff.png').name})", ""] \
        if report["plot"].startswith("written") else [f"Trade-off plot: {report['plot']}", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    report["markdown"] = "\n".join(md)
    return report


def _inference_points(rows: list[dict], costs: dict[str, float], ref_cost: float | None) -> list[dict]:
    """Rows without a budget (baselines, compressed models) plus each path's largest budget within the limit."""
    by = {r["stage"]: r for r in rows}
    out = [r for r in rows if path_of(r["stage"])[1] is None]
    for pts in curves(rows, costs, ref_cost).values():
        within = [p for p in pts if p["fraction"] is None or p["fraction"] <= MAX_BUDGET + 1e-12] or pts
        out.append(by[within[-1]["stage"]])
    return [r for r in out if bit_ops(r)]


def make_plot(rows: list[dict], costs: dict[str, float], path: Path) -> str:
    """Two panels: worst-case robust accuracy against training cost (one line per path, the baseline
    as a reference line) and against inference cost (bit-operations per image). Labels are in legends,
    never on the points, so they cannot overlap. Needs matplotlib (optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install 'rcomp[plot]')"
    by = {r["stage"]: r for r in rows}
    base = by.get(REFERENCE)
    ref_cost = costs.get(REFERENCE)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6), dpi=110)
    for name, pts in curves(rows, costs, ref_cost).items():
        xy = [(p["fraction"], p["robust"]) for p in pts if p["fraction"] is not None]
        if xy:
            left.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=name)
    if base is not None:
        for ax in (left, right):
            ax.axhline(base["worst_case_acc"], color="k", ls="--", lw=1, label=f"{REFERENCE} (reference)")
            ax.axhline(TARGET_FRACTION * base["worst_case_acc"], color="grey", ls=":", lw=1,
                       label=f"{TARGET_FRACTION:.0%} of the reference")
    left.set(xlabel="training cost, all training behind the model (fraction of the adversarial baseline's)",
             ylabel="worst-case robust accuracy", title="Robustness against training cost")
    left.axvline(MAX_BUDGET, color="grey", ls="-.", lw=0.8, label=f"{MAX_BUDGET:.0%} budget limit")
    markers = "osD^v<>px*h"
    for i, r in enumerate(_inference_points(rows, costs, ref_cost)):
        right.scatter(bit_ops(r) / 1e9, r["worst_case_acc"], marker=markers[i % len(markers)], s=40, label=r["stage"])
    right.set(xscale="log", xlabel="inference cost: bit-operations per image (G; MACs x bits x bits)",
              title="Robustness against inference cost\n(each path at its largest budget within the limit)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
    fig.tight_layout()
    import io

    from rcomp.io.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return f"written to {path.name}"
