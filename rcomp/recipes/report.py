"""The demo's report: a side-by-side table, a trade-off plot and a plain-words conclusion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: robust within this many accuracy points of the adversarially trained baseline counts as "reached"
REACHED_MARGIN = 0.02


def _stage_of(path: str, records: list[dict]) -> str:
    for r in records:
        if Path(r.get("output", "")).name == Path(path).name:
            return r["stage"]
    return Path(path).stem


def _train_seconds(stage: str, by_stage: dict[str, dict]) -> float | None:
    rec = by_stage.get(stage)
    return rec.get("seconds") if rec and rec.get("command") == "finetune" else None


def build_report(bench: dict[str, Any], records: list[dict], out_dir: Path, *, recipe_name: str = "demo",
                 plot: bool = True) -> dict[str, Any]:
    """Write report.json, report.md and tradeoff.png into ``out_dir``; return the report dict."""
    from tabulate import tabulate

    from rcomp.io.atomic import atomic_write_text

    by_stage = {r["stage"]: r for r in records}
    rows = []
    for m in bench["models"]:
        stage = _stage_of(m["path"], records)
        rows.append({**m, "stage": stage, "train_seconds": _train_seconds(stage, by_stage)})
    attacks = list(bench["attacks"])
    conclusion = conclude(rows)
    report = {"recipe": recipe_name, "data": bench["data"], "n": bench["n"], "attacks": bench["attacks"],
              "device": bench.get("device"), "threads": bench.get("threads"), "models": rows,
              "conclusion": conclusion["text"], "findings": conclusion["findings"]}

    plot_note = make_plot(rows, out_dir / "tradeoff.png") if plot else "plot skipped (--no-plot)"
    report["plot"] = plot_note

    headers = ["checkpoint", "params", "MACs", "size kB", "latency ms (b1/b128)", "clean",
               *[f"{a}" for a in attacks], "worst", "train s"]
    table = []
    for r in rows:
        lat = r.get("latency_ms") or {}
        lat_s = "/".join(f"{v:.2f}" for v in lat.values()) if lat else "-"
        table.append([r["stage"], f"{r['params']:,}", f"{r['macs']:,}" if r.get("macs") else "-",
                      f"{(r.get('size_bytes') or 0) / 1000:.0f}", lat_s, f"{r['clean_acc']:.3f}",
                      *[f"{r['robust_acc'].get(a, float('nan')):.3f}" for a in attacks],
                      f"{r['worst_case_acc']:.3f}",
                      f"{r['train_seconds']:.1f}" if r.get("train_seconds") is not None else "-"])
    attack_desc = "; ".join(f"{k}: " + ", ".join(f"{pk}={pv}" for pk, pv in v.items() if pk != "name")
                            for k, v in bench["attacks"].items())
    md = [f"# rcomp {recipe_name} report", "",
          f"Data: {bench['data']} ({bench['n']} test images); device {bench.get('device')}, "
          f"{bench.get('threads')} threads.", f"Attacks: {attack_desc}.", "",
          "Robust accuracy counts a point only if it is correct clean and under the attack; *worst* is the "
          "per-example worst case over all attacks. Quantized models are attacked through their gradient "
          "surrogate and scored on their real forward pass.", "",
          tabulate(table, headers=headers, tablefmt="github"), "",
          "## Conclusion", "", conclusion["text"], "",
          f"Trade-off plot: {plot_note}", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    report["markdown"] = "\n".join(md)
    return report


def conclude(rows: list[dict]) -> dict[str, Any]:
    """Did adversarial fine-tuning of the compressed models reach the adversarial baseline's robustness?"""
    by = {r["stage"]: r for r in rows}
    base = by.get("baseline-adv")
    dense = by.get("baseline")
    if base is None:
        return {"text": "No adversarially trained baseline in this run; nothing to compare against.", "findings": []}
    findings, lines = [], []
    ref = base["worst_case_acc"]
    ref_time = base.get("train_seconds")
    for r in rows:
        if not r["stage"].endswith("-ft-pgd"):
            continue
        gap = r["worst_case_acc"] - ref
        reached = gap >= -REACHED_MARGIN
        mac_ratio = (r["macs"] / base["macs"]) if r.get("macs") and base.get("macs") else None
        time_ratio = (r["train_seconds"] / ref_time) if r.get("train_seconds") and ref_time else None
        f = {"model": r["stage"], "robust": r["worst_case_acc"], "baseline_robust": ref, "gap": gap,
             "reached": reached, "clean": r["clean_acc"], "macs_ratio": mac_ratio,
             "train_time_ratio": time_ratio}
        findings.append(f)
        cost = []
        if mac_ratio is not None:
            cost.append(f"{mac_ratio:.2f}x the baseline's MACs")
        if time_ratio is not None:
            cost.append(f"{time_ratio:.2f}x its training time")
        lines.append(
            f"- {r['stage']}: worst-case robust accuracy {r['worst_case_acc']:.3f} vs {ref:.3f} for the adversarially "
            f"trained baseline ({gap:+.3f}): {'REACHED' if reached else 'did not reach'} it"
            f"{' (within ' + str(round(REACHED_MARGIN * 100)) + ' points)' if reached else ''}; clean {r['clean_acc']:.3f}"
            + (f"; at {', '.join(cost)}" if cost else "") + "."
        )
    n_reached = sum(f["reached"] for f in findings)
    head = (f"Adversarial fine-tuning of the compressed models reached the adversarially trained baseline's "
            f"robustness in {n_reached} of {len(findings)} cases." if findings else
            "No adversarially fine-tuned compressed model in this run.")
    if dense is not None:
        head += (f" For reference, the standard dense baseline: clean {dense['clean_acc']:.3f}, worst-case robust "
                 f"{dense['worst_case_acc']:.3f}; the adversarial baseline: clean {base['clean_acc']:.3f}, "
                 f"worst-case robust {ref:.3f}.")
    return {"text": "\n".join([head, *lines]), "findings": findings}


def make_plot(rows: list[dict], path: Path) -> str:
    """Robust accuracy against MACs, one labelled marker per checkpoint. Needs matplotlib (optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install 'rcomp[plot]')"
    pts = [(r["macs"], r["worst_case_acc"], r["stage"]) for r in rows if r.get("macs")]
    if not pts:
        return "skipped: no MACs figures to plot"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for macs, acc, label in pts:
        marker = "s" if "ft-pgd" in label or label == "baseline-adv" else "o"
        ax.scatter(macs / 1e6, acc, marker=marker, s=40)
        ax.annotate(label, (macs / 1e6, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("worst-case robust accuracy")
    ax.set_title("Robustness against cost (squares: adversarially trained or fine-tuned)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    from rcomp.io.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return f"written to {path.name}"
