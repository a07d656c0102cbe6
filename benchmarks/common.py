"""Shared helpers for the benchmark scripts.

Every script answers one question and exposes ``run(quick: bool = False) -> list[dict]``; each row
is ``{"figure", "value", "target", "met", "command"}`` (target and met may be None). Run one
script directly (``python benchmarks/bench_x.py``) or all of them with ``python benchmarks/run.py``.
Figures are ratios measured in the same run: medians of several repetitions after warm-up.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable


def train_classifier(arch: str, data: str, shape, epochs: int, data_dir=None):
    """A seeded model trained with Adam (lr 3e-3, batch 64) on ``data``: the benchmarks' starting point.
    One-channel inputs take digits' mean/std; others none (mean 0, std 1)."""
    import torch
    import torch.nn.functional as F

    from rcomp.data.registry import data_info, get_dataset, make_loader
    from rcomp.models.registry import build_model

    info = data_info("digits")
    torch.manual_seed(0)
    mean, std = (list(info.mean), list(info.std)) if shape[0] == 1 else ([0.0] * shape[0], [1.0] * shape[0])
    model = build_model(arch, 10, shape, mean, std, dataset=data)
    ds = get_dataset(data, "train", model.meta.input, data_dir)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in make_loader(ds, 64, shuffle=True, seed=0):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def digits_and_batch(n: int, epochs: int = 3):
    """The demo's convnet8 trained ``epochs`` on digits, and the first ``n`` test images and labels."""
    from rcomp.data.registry import get_dataset
    from rcomp.evaluation.accuracy import fetch

    model = train_classifier("convnet8", "digits", (1, 8, 8), epochs)
    x, y = fetch(get_dataset("digits", "test", model.meta.input), range(n))
    return model, x, y


def ab_setup(script: str, quick: bool) -> tuple[int, int, str]:
    """An interleaved A/B script's one torch thread, ``(rounds, points, command)``: 7 rounds of 128 points, or
    3 of 64 with ``--quick``."""
    setup_threads(1)
    return (3, 64, f"python benchmarks/{script} --quick") if quick else (7, 128, f"python benchmarks/{script}")


def setup_threads(n: int = 2) -> None:
    import torch

    torch.set_num_threads(n)


def median_time(fn: Callable[[], object], reps: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(plain: Callable[[], object], fast: Callable[[], object], rounds: int,
                same: Callable[[object, object], bool]) -> tuple[float, float, float, float, float, bool]:
    """Time ``plain`` and ``fast`` alternately (A, B, A, B ...) ``rounds`` times each: ``(median plain s, median
    fast s, median ratio, min ratio, max ratio, every round's results equal by same(plain's, fast's))``."""
    import statistics
    import time

    times: dict[bool, list[float]] = {False: [], True: []}
    equal = True
    for _ in range(rounds):
        out = {}
        for is_fast, fn in ((False, plain), (True, fast)):
            t0 = time.perf_counter()
            out[is_fast] = fn()
            times[is_fast].append(time.perf_counter() - t0)
        equal = equal and same(out[False], out[True])
    ratios = [p / f for p, f in zip(times[False], times[True], strict=True)]
    return (statistics.median(times[False]), statistics.median(times[True]), statistics.median(ratios), min(ratios),
            max(ratios), equal)


def speed_rows(what: str, labels: str, timing: tuple, same_label: str, command: str) -> list[dict]:
    """The three rows of an :func:`interleaved` comparison: times, speed-up (median [min, max]), equal results."""
    p, f, med, lo, hi, same = timing
    return [row(f"{what}: {labels} s", f"{p:.3f} / {f:.3f}", command=command),
            row(f"{what}: speed-up (median [min, max])", f"{med:.2f}x [{lo:.2f}, {hi:.2f}]", ">= 1.0x",
                lo >= 1.0 or med >= 1.05, command),
            row(f"{what}: {same_label}", same, "same", same, command)]


def row(figure: str, value, target: str | None = None, met: bool | None = None, command: str = "") -> dict:
    return {"figure": figure, "value": value, "target": target, "met": met, "command": command}


def print_table(rows: list[dict], command: str | None = None) -> None:
    from tabulate import tabulate

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else v

    table = [(r["figure"], fmt(r["value"]), r.get("target") or "-",
              {True: "yes", False: "NO", None: "-"}[r.get("met")]) for r in rows]
    print(tabulate(table, headers=["figure", "value", "target", "met"], tablefmt="github"))
    print(f"\ncommand: {command or 'python ' + ' '.join(sys.argv)}")


JSON_PREFIX = "RCOMP-BENCH-ROWS "


def main(run: Callable[..., list[dict]], options: dict[str, dict] | None = None) -> None:
    """The script's command line: ``--quick`` (smaller sizes), ``--json`` (the rows as one JSON line, used by
    run.py), ``--help`` (the script's docstring; runs nothing) and the script's own ``options`` (argparse
    keyword arguments by flag; the script reads them from ``sys.argv``). An unknown flag exits 2."""
    import argparse

    doc = (sys.modules["__main__"].__doc__ or "").strip()
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line (benchmarks/run.py)")
    for flag, kwargs in (options or {}).items():
        ap.add_argument(flag, **kwargs)
    args = ap.parse_args()
    rows = run(quick=args.quick)
    if args.json:
        import json

        print(JSON_PREFIX + json.dumps(rows, default=str), flush=True)
    else:
        print_table(rows)
