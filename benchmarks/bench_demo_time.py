"""How long does `rcomp demo` take, and where does the time go? (issue 25: under 4 minutes on 2 CPU threads)

Runs ``rcomp demo`` (``--quick``: ``rcomp demo --quick``) in a fresh folder with ``OMP_NUM_THREADS=2`` unless set,
and reports its wall time, its CPU seconds (user + system of the process and its children; on a shared machine
the CPU figure is the one to compare) and each stage group's share of the stage time, from the recipe's stamps
(``.rcomp-run/*.json``), plus ``auto``'s seconds per judged checkpoint (bench-auto.json). ``--from DIR``
reads a finished demo folder instead of running one (wall and CPU then unknown). Say the load average
beside the figures (``uptime``): they are only comparable on the same, idle machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import main, row  # noqa: E402

GOAL_S = 240.0
COMPRESS = {"pruned", "pruned-adv", "int8", "int4"}


def group(stage: str) -> str:
    if stage.startswith("baseline"):
        return "baselines"
    if stage in COMPRESS:
        return "compress"
    if "-ft-" in stage:
        return "fine-tuning"
    if stage.startswith("ship") or stage == "bench-ship":
        return "shipped file"
    return stage  # bench, bench-auto


def stage_seconds(out: Path) -> dict[str, float]:
    return {p.stem: float(json.loads(p.read_text())["seconds"]) for p in sorted((out / ".rcomp-run").glob("*.json"))}


def _from_arg() -> Path | None:
    """``--from DIR`` as given to the script (main() has checked the flags)."""
    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a == "--from" and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--from="):
            return Path(a.split("=", 1)[1])
    return None


def run(quick: bool = False, source: Path | None = None) -> list[dict]:
    source = source if source is not None else _from_arg()
    cmd = ["rcomp", "demo", *(["--quick"] if quick else []), "--no-plot"]
    wall = cpu = None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(source) if source else Path(tmp) / "demo"
        if source is None:
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "rcomp", *cmd[1:], "--out-dir", str(out)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        secs = stage_seconds(out)
        auto = json.loads((out / "bench-auto.json").read_text()) if (out / "bench-auto.json").exists() else None
    shown = " ".join(cmd) + (f" (read from {source})" if source else "")
    total = sum(secs.values())
    rows = []
    if wall is not None:
        rows += [row("wall seconds", wall, f"<= {GOAL_S:.0f}" if not quick else None,
                     wall <= GOAL_S if not quick else None, shown),
                 row("CPU seconds (user + system)", cpu, command=shown)]
    rows.append(row("stage seconds (sum of the stamps)", total, command=shown))
    groups: dict[str, float] = {}
    for stage, s in secs.items():
        groups[group(stage)] = groups.get(group(stage), 0.0) + s
    for name, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        rows.append(row(f"{name}: seconds ({100 * s / total:.0f}% of the stage time)", s, command=shown))
    for m in (auto or {}).get("models", []):
        rows.append(row(f"auto on {Path(m['path']).stem} ({m.get('gradient_source', '?')}): seconds",
                        m.get("eval_seconds"), command=shown))
    return rows


if __name__ == "__main__":
    main(run, options={"--from": {"metavar": "DIR", "default": None,
                                  "help": "read a finished demo folder instead of running the demo"}})
