"""Run every benchmark script and print one table: figure, value, target, met, command.

    python benchmarks/run.py            # all questions
    python benchmarks/run.py --quick    # smaller sizes, fewer repetitions
    python benchmarks/run.py --only startup,quant
    python benchmarks/run.py --markdown docs/benchmarks-latest.md   # also write the table there
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import JSON_PREFIX  # noqa: E402


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def machine() -> str:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def run_one(name: str, quick: bool) -> list[dict]:
    """Run one script in a fresh process (so no allocator, thread-pool or cache state leaks from the
    previous question into its timings) and return its rows."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(JSON_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {tail}")
    return json.loads(lines[-1][len(JSON_PREFIX):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma list of script names without the bench_ prefix")
    ap.add_argument("--markdown", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    from tabulate import tabulate

    from common import setup_threads

    setup_threads(2)
    machine_line = machine()
    wanted = {f"bench_{n.strip()}" for n in args.only.split(",") if n.strip()}
    rows = []
    for name in discover():
        if wanted and name not in wanted:
            continue
        t0 = time.perf_counter()
        print(f"[{name}] running...", file=sys.stderr, flush=True)
        try:
            for r in run_one(name, args.quick):
                rows.append((name[len("bench_"):], r))
        except Exception as exc:  # noqa: BLE001 - one failing question must not hide the others
            rows.append((name[len("bench_"):], {"figure": f"FAILED: {type(exc).__name__}: {exc}", "value": None,
                                               "target": None, "met": False, "command": ""}))
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else v)

    table = [(q, r["figure"], fmt(r["value"]), r.get("target") or "-",
              {True: "yes", False: "NO", None: "-"}[r.get("met")], r.get("command") or "-") for q, r in rows]
    headers = ["question", "figure", "value", "target", "met", "command"]
    text = tabulate(table, headers=headers, tablefmt="github")
    cmd = "python " + " ".join(sys.argv)
    print(text)
    print(f"\nmachine: {machine_line}\ncommand: {cmd}")
    if args.markdown:
        Path(args.markdown).write_text(f"{text}\n\nmachine: {machine_line}\n\ncommand: `{cmd}`\n")


if __name__ == "__main__":
    main()
