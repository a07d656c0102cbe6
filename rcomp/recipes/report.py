"""The demo's report: a side-by-side table, robustness-against-cost curves and a verdict per path.

The question (Thorsteinsson et al., arXiv 2403.09441): does a compressed model, adversarially
fine-tuned briefly, reach the robustness of an adversarially trained dense model at a fraction of
its cost? Costs are counted, not guessed: a training step costs ``1 + attack steps`` forward and
backward passes (PGD-7 training: 8), so every fine-tuning budget is stated as a fraction of the
adversarially trained baseline's training cost. A path *reaches* the baseline when its worst-case
robust accuracy is at least :data:`TARGET_FRACTION` of the baseline's, compared on the raw
numbers (a miss is never rounded into a success); the report gives the smallest budget at which
each path does so, or says that it does not within :data:`MAX_BUDGET` of the baseline's cost.

Two accountings, both reported: *total* counts all the training behind a checkpoint (the model it
was compressed from included); *own* counts only its last fine-tuning run (the pretrained model as
a sunk cost, as a user who already has a model sees it). A point can *reach* the baseline only if
it was judged by every attack the baseline was judged by (the demo judges the baselines and, per path,
the better fine-tuning method by PGD-10 with ``auto``; a point measured by PGD alone is an upper bound and
is said to be).

Stage names the report understands: ``baseline`` (standard dense), ``baseline-adv`` (the
reference), ``PATH-sN`` (path ``PATH`` fine-tuned for ``N`` steps, one point of a curve) and, from
older recipes, ``MODEL-ft-pgd`` (one point per path).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rcomp.quant.catalog import MODES, is_real
from rcomp.train.budget import history_cost

#: a path reaches the baseline at this fraction of its worst-case robust accuracy
TARGET_FRACTION = 0.95
#: budgets are searched up to this fraction of the baseline's training cost
MAX_BUDGET = 0.5
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
    if not q or q.get("mode") not in MODES.builtin or is_real(q) or not bits:
        return None
    return row["params"] * int(bits) / 8


def bit_ops(row: dict) -> float | None:
    """Bit-operations per image: MACs x weight bits x activation bits (32 x 32 for float models)."""
    if not row.get("macs"):
        return None
    q = row.get("quantization") or {}
    bits = int(q.get("bits") or (8 if row.get("quantized") else 32))
    return float(row["macs"]) * bits * bits


# ----------------------------------------------------------------------------- benches


def merge_benches(bench: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """``bench`` with the rows of ``extra`` (a stronger bench of some of the same files) in place of
    its own: the demo benches everything with PGD and judges some models again with ``pgd,auto``."""
    if not extra:
        return bench
    better = {Path(m["path"]).name: m for m in extra["models"]}
    rows = [better.get(Path(m["path"]).name, m) for m in bench["models"]]
    known = {Path(m["path"]).name for m in bench["models"]}
    rows += [m for m in extra["models"] if Path(m["path"]).name not in known]
    return {**bench, "models": rows, "attacks": {**bench["attacks"], **extra["attacks"]},
            "judged": {"all": sorted(bench["attacks"]), "selected": sorted(extra["attacks"]),
                       "selected_n": extra.get("n")}}


def judged_by(row: dict) -> tuple[str, ...]:
    """The attacks a row's worst case is over."""
    return tuple(sorted((row.get("robust_acc") or {}).keys()))


# ----------------------------------------------------------------------------- verdicts


def curves(rows: list[dict], costs: dict[str, float], ref_cost: float | None,
           own_costs: dict[str, float] | None = None, ref_attacks: tuple[str, ...] | None = None
           ) -> dict[str, list[dict]]:
    """``{path: [{"stage", "steps", "fraction", "own", "robust", "clean", "full"}, ...]}`` sorted by total
    cost fraction. ``fraction``: total cost / the baseline's; ``own``: the last run's; ``full``: judged by
    every attack in ``ref_attacks`` (the baseline's), so comparable with it."""
    out: dict[str, list[dict]] = {}
    own_costs = own_costs or {}
    for r in rows:
        path, steps = path_of(r["stage"])
        if steps is None:
            continue
        out.setdefault(path, []).append({"stage": r["stage"], "steps": steps,
                                         "fraction": _fraction(costs.get(r["stage"]), ref_cost),
                                         "own": _fraction(own_costs.get(r["stage"]), ref_cost),
                                         "robust": r["worst_case_acc"], "clean": r["clean_acc"],
                                         "full": ref_attacks is None or set(ref_attacks) <= set(judged_by(r))})
    for pts in out.values():
        pts.sort(key=lambda p: (p["fraction"] is None, p["fraction"] or 0.0, p["steps"]))
    return out


def _fraction(cost: float | None, ref: float | None) -> float | None:
    """The one place a cost becomes a fraction of the baseline's: the table, verdicts and plot all use it."""
    return cost / ref if cost is not None and ref else None


def smallest_budget(points: list[dict], target: float, max_fraction: float = MAX_BUDGET,
                    key: str = "fraction") -> dict | None:
    """The cheapest comparable point with ``robust >= target`` (raw numbers) at most ``max_fraction`` of the cost."""
    ok = [p for p in points if p.get(key) is not None and p[key] <= max_fraction + 1e-12 and p["robust"] >= target
          and p.get("full", True)]
    return min(ok, key=lambda p: (p[key], p["steps"])) if ok else None


def _verdict_line(path: str, pts: list[dict], ref: float, target: float, key: str = "fraction") -> tuple[dict, str]:
    hit = smallest_budget(pts, target, key=key)
    known = [p for p in pts if p.get(key) is not None and p[key] <= MAX_BUDGET + 1e-12]
    full = [p for p in known if p.get("full", True)]
    best = max(full or known or pts, key=lambda p: p["robust"])
    upper = not best.get("full", True)
    f = {"path": path, "accounting": "total" if key == "fraction" else "own", "reached": hit is not None,
         "budget_fraction": hit[key] if hit else None, "stage": (hit or best)["stage"],
         "robust": (hit or best)["robust"], "best_robust": best["robust"], "best_stage": best["stage"],
         "upper_bound": upper and hit is None, "baseline_robust": ref, "target": target, "points": pts}
    what = "all training included" if key == "fraction" else "its own fine-tuning only"
    if hit:
        text = (f"- {path}: reaches {TARGET_FRACTION:.0%} of the baseline's worst-case robust accuracy "
                f"({hit['robust']:.4f} >= {target:.4f}) at {hit[key]:.1%} of the baseline's training cost, "
                f"{what} ({hit['steps']} fine-tuning steps).")
    else:
        where = f" at {best[key]:.1%} of the cost" if best.get(key) is not None else ""
        bound = " (PGD-10 only: an upper bound, not judged by the baseline's attacks)" if upper else ""
        text = (f"- {path}: does NOT reach {TARGET_FRACTION:.0%} of the baseline's worst-case robust accuracy "
                f"within {MAX_BUDGET:.0%} of the baseline's training cost ({what}): best {best['robust']:.4f}"
                f"{bound}{where}, needed {target:.4f}" + _beyond(pts, target, key) + ".")
    return f, text


def _beyond(pts: list[dict], target: float, key: str = "fraction") -> str:
    """Where a path reaches the target only above the budget limit, say at what cost."""
    over = [p for p in pts if p.get(key) is not None and p["robust"] >= target and p.get("full", True)]
    if not over:
        return ""
    p = min(over, key=lambda q: q[key])
    return f"; it does at {p[key]:.1%}" + (" (its starting model's training counted)" if key == "fraction" else "")


def _single_points(rows: list[dict]) -> dict[str, list[dict]]:
    """Older recipes: one ``MODEL-ft-pgd`` point per path, cost unknown."""
    return {r["stage"]: [{"stage": r["stage"], "steps": None, "fraction": None, "own": None,
                          "robust": r["worst_case_acc"], "clean": r["clean_acc"]}]
            for r in rows if r["stage"].endswith("-ft-pgd")}


def conclude(rows: list[dict], costs: dict[str, float] | None = None, *, smoke: bool = False,
             own_costs: dict[str, float] | None = None) -> dict[str, Any]:
    """Per path: the smallest budget reaching ``TARGET_FRACTION`` of the baseline's robustness, or a miss,
    in total accounting (``costs``) and, given ``own_costs``, in own accounting."""
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
    paths = curves(rows, costs, ref_cost, own_costs, judged_by(base)) or _single_points(rows)
    findings, lines = [], []
    for path, pts in paths.items():
        f, text = _verdict_line(path, pts, ref, target)
        findings.append(f)
        lines.append(text)
    n = sum(f["reached"] for f in findings)
    judged = ", ".join(judged_by(base))
    head = (f"Baseline (adversarially trained dense model): worst-case robust accuracy {ref:.4f} ({judged}), so the "
            f"target is {target:.4f} ({TARGET_FRACTION:.0%}); costs count all the training that went into a model, "
            "the model it was compressed from included, as a fraction of the baseline's training cost"
            + (f" ({ref_cost:,.0f} forward+backward passes)" if ref_cost else " (unknown here)")
            + f". {n} of {len(findings)} paths reach the target within {MAX_BUDGET:.0%}.")
    dense = by.get("baseline")
    if dense is not None:
        head += (f" Standard dense model: clean {dense['clean_acc']:.4f}, worst-case robust "
                 f"{dense['worst_case_acc']:.4f}.")
    text = [head, *lines]
    if own_costs:
        own_lines = []
        for path, pts in paths.items():
            f, line = _verdict_line(path, pts, ref, target, key="own")
            findings.append(f)
            own_lines.append(line)
        m = sum(f["reached"] for f in findings if f["accounting"] == "own")
        text += ["", f"Own accounting (the pretrained model as a sunk cost: only the fine-tuning counts): {m} of "
                     f"{len(own_lines)} paths reach the target within {MAX_BUDGET:.0%}.", *own_lines]
    return {"text": "\n".join(text), "findings": findings}


def unsettled_choices(rows: list[dict], records: list[dict]) -> list[dict]:
    """Run-time choices (a recipe's ``{best: [...], by: BENCH}``, e.g. the demo's: which of a path's two methods
    ``auto`` judges) that the first bench could not settle: a candidate left out is judged by fewer attacks
    than the chosen one and still reads at least as robust, so its lower figure is unknown. One dict each:
    ``stage``, ``by``, ``chosen``, ``chosen_worst``, ``chosen_judged``, ``other``, ``other_worst``,
    ``other_judged``."""
    by = {r["stage"]: r for r in rows}
    out = []
    for rec in records:
        for c in rec.get("choices") or []:
            chosen = by.get(c.get("chosen"))
            if chosen is None:
                continue
            for name in c.get("figures") or {}:
                other = by.get(name)
                if other is None or name == c["chosen"]:
                    continue
                if set(judged_by(other)) < set(judged_by(chosen)) and other["worst_case_acc"] >= chosen["worst_case_acc"]:
                    out.append({"stage": rec["stage"], "by": c.get("by"), "chosen": c["chosen"],
                                "chosen_worst": chosen["worst_case_acc"], "chosen_judged": judged_by(chosen),
                                "other": name, "other_worst": other["worst_case_acc"],
                                "other_judged": judged_by(other)})
    return out


def _unsettled_lines(found: list[dict]) -> list[str]:
    return [f"- {u['other']} ({'+'.join(u['other_judged'])} only: {u['other_worst']:.4f}, an upper bound) reads at "
            f"least as robust as {u['chosen']} ({u['chosen_worst']:.4f} by {'+'.join(u['chosen_judged'])}), which "
            f"stage {u['stage']} chose by stage {u['by']}: this run does not tell which of the two is more robust "
            "(judge both with the same attacks to know)." for u in found]


# ----------------------------------------------------------------------------- the report


def _table(rows: list[dict], attacks: list[str], costs: dict[str, float], ref_cost: float | None,
           ft_costs: dict[str, float] | None = None):
    batches = list(rows[0].get("latency_ms") or {}) if rows else []
    headers = ["checkpoint", "params", "MACs", "size kB (effective)",
               f"latency ms (batch {'/'.join(batches)})" if batches else "latency ms", "clean", *attacks,
               "worst", "judged by", "total train cost", "own train cost"]
    table = []
    for r in rows:
        lat = r.get("latency_ms") or {}
        eff = effective_size(r)
        size = f"{(r.get('size_bytes') or 0) / 1000:.0f}" + (f" ({eff / 1000:.1f} at "
                                                             f"{r['quantization']['bits']} bits)" if eff else "")
        table.append([r["stage"], f"{r['params']:,}", f"{r['macs']:,}" if r.get("macs") else "-", size,
                      "/".join(f"{v:.2f}" for v in lat.values()) if lat else "-", f"{r['clean_acc']:.3f}",
                      *[f"{r['robust_acc'][a]:.3f}" if a in r["robust_acc"] else "-" for a in attacks],
                      f"{r['worst_case_acc']:.3f}", "+".join(judged_by(r)),
                      _frac(costs.get(r["stage"]), ref_cost), _frac((ft_costs or {}).get(r["stage"]), ref_cost)])
    return headers, table


def _frac(cost: float | None, ref: float | None) -> str:
    f = _fraction(cost, ref)
    return f"{f:.1%}" if f is not None else "-"


def build_report(bench: dict[str, Any], records: list[dict], out_dir: Path, *, recipe_name: str = "demo",
                 plot: bool = True, smoke: bool = False, costs: dict[str, float] | None = None,
                 own_costs: dict[str, float] | None = None, extra_bench: dict[str, Any] | None = None,
                 ship_bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.json, report.md (with the plot embedded) and tradeoff.png into ``out_dir``.

    ``smoke``: a ``--quick`` run; the report says so and draws no conclusion. ``costs``/``own_costs``:
    ``{stage: forward+backward passes}``, all the training behind a model / its last run (default: read
    from each checkpoint's history). ``extra_bench``: a stronger bench of some models (their rows replace
    ``bench``'s). ``ship_bench``: a bench of a checkpoint beside its ONNX exports (section "The shipped
    file", key ``shipped``)."""
    from tabulate import tabulate

    from rcomp.io.atomic import atomic_write_text

    out_dir = Path(out_dir)
    bench = merge_benches(bench, extra_bench)
    rows = [{**m, "stage": _stage_of(m["path"], records)} for m in bench["models"]]
    costs = dict(costs) if costs is not None else checkpoint_costs(rows)
    own = dict(own_costs) if own_costs is not None else checkpoint_costs(rows, last_only=True)
    ref_cost = costs.get(REFERENCE)
    conclusion = conclude(rows, costs, smoke=smoke, own_costs=own or None)
    unsettled = [] if smoke else unsettled_choices(rows, records)
    if unsettled:
        conclusion["text"] += ("\n\nChoices the first bench could not settle:\n" + "\n".join(_unsettled_lines(unsettled)))
    report = {"recipe": recipe_name, "data": bench["data"], "n": bench["n"], "attacks": bench["attacks"],
              "device": bench.get("device"), "threads": bench.get("threads"), "models": rows, "smoke": smoke,
              "costs": costs, "own_costs": own, "conclusion": conclusion["text"],
              "findings": conclusion["findings"], "judged": bench.get("judged"), "unsettled_choices": unsettled}
    report["plot"] = make_plot(rows, costs, out_dir / "tradeoff.png", own) if plot else "plot skipped (--no-plot)"
    attacks = list(dict.fromkeys(a for r in rows for a in judged_by(r)))
    headers, table = _table(rows, attacks, costs, ref_cost, own)
    attack_desc = "; ".join(f"{k}: " + ", ".join(f"{pk}={pv}" for pk, pv in v.items() if pk != "name")
                            for k, v in bench["attacks"].items())
    md = [f"# rcomp {recipe_name} report", ""]
    if smoke:
        md += ["**Smoke run (--quick): no conclusions.**", ""]
    judged = bench.get("judged")
    md += [f"Data: {bench['data']} ({bench['n']} test images); device {bench.get('device')}, "
           f"{bench.get('threads')} torch thread{'' if bench.get('threads') == 1 else 's'} a process.",
           f"Attacks: {attack_desc}.", ""]
    if judged:
        md += [f"Every checkpoint is benched with {', '.join(judged['all'])}; those whose *judged by* lists "
               f"{', '.join(judged['selected'])} were judged again with these attacks on {judged['selected_n']} images "
               "(the demo: the baselines and, of each path's two fine-tuning methods at its 50% point, the one the "
               "first bench found more robust). A point judged by fewer attacks than the baseline is an upper "
               "bound and cannot reach the target.", ""]
    md += ["Robust accuracy counts a point only if it is correct clean and under the attack; *worst* is the "
           "per-example worst case over all attacks. Quantized models are attacked through their gradient "
           "surrogate and scored on their real forward pass. *total train cost*: forward+backward passes of all "
           "the training behind a checkpoint (its starting model's included) as a fraction of the adversarially "
           "trained baseline's; *own train cost*: its own fine-tuning only (the pretrained model as a sunk cost). "
           "Simulated quantization is stored in float; the effective size is parameters x bits / 8.", "",
           tabulate(table, headers=headers, tablefmt="github"), "",
           "## Conclusion", "", conclusion["text"], ""]
    md += [f"![robustness against training and inference cost]({Path(out_dir / 'tradeoff.png').name})", ""] \
        if report["plot"].startswith("written") else [f"Trade-off plot: {report['plot']}", ""]
    if ship_bench:
        report["shipped"] = shipped(ship_bench)
        md += ship_section(report["shipped"], tabulate)
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    report["markdown"] = "\n".join(md)
    return report


# ----------------------------------------------------------------------------- the shipped file


def shipped(bench: dict[str, Any]) -> dict[str, Any]:
    """The shipped-file rows: each model of a bench of a checkpoint and its ONNX exports, with what the report
    prints (file, size, latency, clean, robust per attack, worst, gradient source, runtime)."""
    rows = []
    for m in bench["models"]:
        name = Path(m["path"]).name
        rows.append({"file": name, "format": "onnx" if name.lower().endswith(".onnx") else "checkpoint",
                     "size_bytes": m.get("size_bytes"), "latency_ms": m.get("latency_ms"), "clean_acc": m["clean_acc"],
                     "robust_acc": m["robust_acc"], "worst_case_acc": m["worst_case_acc"],
                     "gradient_source": m.get("gradient_source"), "quantization": m.get("quantization")})
    return {"n": bench.get("n"), "attacks": bench.get("attacks"), "threads": bench.get("threads"),
            "thread_policy": bench.get("thread_policy"), "models": rows}


def ship_section(ship: dict[str, Any], tabulate) -> list[str]:
    """Markdown lines of "The shipped file": a table of :func:`shipped`'s rows."""
    rows = ship["models"]
    attacks = list(dict.fromkeys(a for r in rows for a in r["robust_acc"]))
    batches = list(rows[0].get("latency_ms") or {}) if rows else []
    headers = ["file", "size kB", f"latency ms (batch {'/'.join(batches)})" if batches else "latency ms", "clean",
               *attacks, "worst", "gradient source"]
    table = [[r["file"], f"{(r['size_bytes'] or 0) / 1000:.1f}",
              "/".join(f"{v:.2f}" for v in (r["latency_ms"] or {}).values()) or "-", f"{r['clean_acc']:.3f}",
              *[f"{r['robust_acc'][a]:.3f}" if a in r["robust_acc"] else "-" for a in attacks],
              f"{r['worst_case_acc']:.3f}", r.get("gradient_source") or "-"] for r in rows]
    policy = f", thread policy {ship['thread_policy']}" if ship.get("thread_policy") else ""
    return ["## The shipped file", "",
            f"The study's path at its 50%-total point (pruned 0.5, fine-tuned by the method the PGD bench found more "
            f"robust: {rows[0]['file'] if rows else '-'}) exported to ONNX (parity-checked "
            f"against the checkpoint) and made int8 by ONNX Runtime, benched beside the checkpoint on the same "
            f"{ship.get('n')} points{policy}. Gradient attacks on an .onnx file are crafted on the checkpoint its "
            "metadata names and scored on the file (transfer); Square queries the file itself; worst is per "
            "example over both.", "", tabulate(table, headers=headers, tablefmt="github"), ""]


# ----------------------------------------------------------------------------- the plot

#: markers and colours: within a panel no two series share a (marker, colour) pair, nor a marker while
#: there are at most len(MARKERS) series
MARKERS = "osD^v<>pX*hPdH8"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")


def _styles(names: list[str]) -> dict[str, tuple[str, str]]:
    return {n: (MARKERS[i % len(MARKERS)], COLORS[(i + i // len(MARKERS)) % len(COLORS)])
            for i, n in enumerate(names)}


def plot_data(rows: list[dict], costs: dict[str, float], own_costs: dict[str, float] | None = None
              ) -> dict[str, Any]:
    """Everything the plot draws, computed with the table's and the verdicts' own functions.

    ``training``: one panel per accounting (``total``, and ``own`` when ``own_costs`` is given), each
    ``{"limit": x of the budget line, "series": {path: [(x, robust, stage), ...]}}``, x being
    :func:`_fraction` of the cost the table prints; ``inference``: ``[(stage, G bit-ops, robust)]``,
    the rows without a budget plus, per path, the point the conclusion quotes in total accounting;
    ``styles``: ``{"training": {path: (marker, colour)}, "inference": {stage: (marker, colour)}}``."""
    by = {r["stage"]: r for r in rows}
    base = by.get(REFERENCE)
    ref_cost = costs.get(REFERENCE)
    paths = curves(rows, costs, ref_cost, own_costs, judged_by(base) if base else None)
    panels = {"total": "fraction", **({"own": "own"} if own_costs else {})}
    training = {name: {"limit": MAX_BUDGET,
                       "series": {path: [(p[key], p["robust"], p["stage"]) for p in pts if p[key] is not None]
                                  for path, pts in paths.items()}}
                for name, key in panels.items()}
    quoted = []
    if base is not None:
        target = TARGET_FRACTION * base["worst_case_acc"]
        quoted = [_verdict_line(path, pts, base["worst_case_acc"], target)[0]["stage"] for path, pts in paths.items()]
    else:
        quoted = [max(pts, key=lambda p: p["robust"])["stage"] for pts in paths.values()]
    inference = [(r["stage"], bit_ops(r) / 1e9, r["worst_case_acc"])
                 for r in [*(r for r in rows if path_of(r["stage"])[1] is None), *(by[s] for s in quoted)]
                 if bit_ops(r)]
    styles = {"training": _styles(list(paths)), "inference": _styles(list(dict.fromkeys(s for s, _, _ in inference)))}
    return {"training": training, "inference": inference, "styles": styles,
            "reference": base["worst_case_acc"] if base else None}


def make_plot(rows: list[dict], costs: dict[str, float], path: Path, own_costs: dict[str, float] | None = None
              ) -> str:
    """Panels of :func:`plot_data`: worst-case robust accuracy against training cost in each accounting
    (one line per path, the budget limit and the baseline as reference lines) and against inference
    cost (bit-operations per image). Labels are in legends, never on the points. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install 'rcomp[plot]')"
    data = plot_data(rows, costs, own_costs)
    n = len(data["training"]) + 1
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 6), dpi=110)
    what = {"total": "all training behind the model", "own": "its own fine-tuning only"}
    for ax, (name, panel) in zip(axes, data["training"].items(), strict=False):
        for series, pts in panel["series"].items():
            if pts:
                mk, col = data["styles"]["training"][series]
                ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker=mk, color=col, label=series)
        ax.axvline(panel["limit"], color="grey", ls="-.", lw=0.8, label=f"{panel['limit']:.0%} budget limit ({name})")
        ax.set(xlabel=f"training cost, {what[name]} (fraction of the adversarial baseline's)",
               ylabel="worst-case robust accuracy", title=f"Robustness against training cost ({name})")
    right = axes[-1]
    for stage, x, y in data["inference"]:
        mk, col = data["styles"]["inference"][stage]
        right.scatter(x, y, marker=mk, color=col, s=40, label=stage)
    right.set(xscale="log", xlabel="inference cost: bit-operations per image (G; MACs x bits x bits)",
              title="Robustness against inference cost\n(each path at the point its verdict quotes)")
    for ax in axes:
        if data["reference"] is not None:
            ax.axhline(data["reference"], color="k", ls="--", lw=1, label=f"{REFERENCE} (reference)")
            ax.axhline(TARGET_FRACTION * data["reference"], color="grey", ls=":", lw=1,
                       label=f"{TARGET_FRACTION:.0%} of the reference")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.tight_layout()
    import io

    from rcomp.io.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return f"written to {path.name}"
