"""What the CLI prints: paths and JSON on stdout, logs and tables on stderr, reports as tables.

Every string that came from a file is passed through :func:`rcomp.text.printable`, so terminal
escapes in checkpoint metadata never reach the terminal raw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rcomp.text import printable


def log(msg: str) -> None:
    """Logs go to stderr (stdout is kept for results and output paths), control characters escaped:
    log lines quote names that came from files."""
    print("\n".join(printable(line, limit=None) for line in str(msg).split("\n")), file=sys.stderr, flush=True)


def emit_path(path: Path) -> None:
    print(str(path), flush=True)


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str), flush=True)


def print_training(report: dict[str, Any]) -> None:
    """The epoch table and test figures of a finetune run (stderr)."""
    from tabulate import tabulate

    cols = ("epoch", "lr", "loss", "train_acc", "train_adv_acc", "val_clean_acc", "val_robust_acc")
    rows = [[r.get(k, "") for k in cols] for r in report.get("epochs", [])]
    log(tabulate(rows, headers=["epoch", "lr", "loss", "train acc", "train adv acc", "val clean", "val robust"],
                 tablefmt="simple"))
    from rcomp.data.subset import points_text

    test = {k[5:]: v for k, v in report.items() if k.startswith("test_") and k != "test_points"}
    if test:
        log("test: " + ", ".join(f"{k} {v}" for k, v in test.items())
            + (f"; on {points_text(report['test_points'])}" if report.get("test_points") else ""))


def print_attack_report(d: dict[str, Any]) -> None:
    from tabulate import tabulate

    where = f"{d['data']} {d['split']}" if d["data"] else f"examples from {printable(d['source']['path'])}"
    print(f"model: {printable(d['path'])} ({printable(d['arch'])}; attack gradients: {d['gradient_source']})")
    print(f"data: {where}, n={d['n']}, device {d['device']}, seed {d.get('seed')}, mode {d.get('mode')}")
    if d.get("points"):
        from rcomp.data.subset import points_text

        print(f"points: {points_text(d['points'])}")
    print(f"clean accuracy: {d['clean_acc']:.4f}\n")
    rows = []
    for key, a in d["attacks"].items():
        p = a["params"]
        eps = p.get("eps")
        rows.append((key, p.get("norm", "-"), f"{eps:.5g}" if isinstance(eps, float) else (eps or "-"),
                     p.get("steps", "-"), f"{a['robust_acc']:.4f}", f"{a['success_rate']:.4f}",
                     f"{a['mean_norm']:.4g}", f"{a['max_norm']:.4g}", f"{a['examples_per_s']:.1f}"))
    print(tabulate(rows, headers=["attack", "norm", "eps", "steps", "robust acc", "success rate", "mean norm",
                                  "max norm", "examples/s"], tablefmt="simple"))
    stages = d.get("stage_robust_acc") or {}
    if d.get("mode") == "cascade" and stages:
        print("\ncascade (robust accuracy after each stage): "
              + ", ".join(f"{k} {v:.4f}" for k, v in stages.items()))
    if len(d["attacks"]) > 1:
        print(f"\nworst case over all attacks: {d['worst_case_acc']:.4f}")
    if d.get("gradient_masking_suspected"):
        print(f"warning: gradient masking suspected: {d['gradient_masking_suspected']} point(s) fooled by a "
              "gradient-free attack that every gradient attack missed; trust the worst case, not the gradient figures")
