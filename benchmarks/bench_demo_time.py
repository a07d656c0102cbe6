"""How long does `rcomp demo` take, and where does the time go? (issue 25: under 4 minutes on 2 CPU threads)

Runs ``rcomp demo`` (``--quick``: ``rcomp demo --quick``) in a fresh folder as a user would (min(2, cores)
worker processes of cores // workers threads each; OMP_NUM_THREADS, when set, is each one's), and reports its
wall time, its CPU seconds (user + system of the process and its workers; on a shared machine the CPU figure is the one to compare) and each stage group's share of the stage time, from the recipe's stamps
(``.rcomp-run/*.json``), plus ``auto``'s seconds per judged checkpoint (bench-auto.json). ``--from DIR``
reads a finished demo folder instead of running one (wall and CPU then unknown). Say the load average
beside the figures (``uptime``): they are only comparable on the same, idle machine.

``--workers 1,2`` runs the demo once per value (``rcomp demo --workers N``), ``--repeat K`` times each (fresh
folders), and reports each value's median wall and CPU seconds with their spread (min-max), the CPU model and
the load average before and after; without ``--workers`` the demo picks its own (min(2, cores)).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
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


def _arg(flag: str) -> str | None:
    """``FLAG VALUE`` as given to the script (main() has checked the flags)."""
    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _from_arg() -> Path | None:
    value = _arg("--from")
    return Path(value) if value is not None else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _demo(cmd: list[str], out: Path) -> tuple[float, float]:
    """Run the demo into ``out``: (wall seconds, CPU seconds of it and its workers)."""
    env = dict(os.environ)  # OMP_NUM_THREADS as set; unset, each worker takes cores // workers threads
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rcomp", *cmd[1:], "--out-dir", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare_workers(quick: bool, workers: list[int], repeat: int) -> list[dict]:
    """Median (and min-max) wall and CPU seconds of the demo per --workers value, ``repeat`` runs each, the
    values interleaved so that a change in the machine's load hits them alike."""
    cmds = {n: ["rcomp", "demo", *(["--quick"] if quick else []), "--no-plot", "--workers", str(n)] for n in workers}
    times: dict[int, list[tuple[float, float]]] = {n: [] for n in workers}
    rows = [row("CPU", cpu_model()), row("load average (1/5/15 min) before", load())]
    for _ in range(repeat):
        for n in workers:
            with tempfile.TemporaryDirectory() as tmp:
                times[n].append(_demo(cmds[n], Path(tmp) / "demo"))
    rows.append(row("load average (1/5/15 min) after", load()))
    for n in workers:
        walls, cpus = [w for w, _ in times[n]], [c for _, c in times[n]]
        shown = " ".join(cmds[n]) + (f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
                                     if "OMP_NUM_THREADS" in os.environ else "")
        rows.append(row(f"--workers {n}: wall seconds, median of {repeat} (min-max {min(walls):.0f}-{max(walls):.0f})",
                        statistics.median(walls), f"<= {GOAL_S:.0f}" if not quick else None,
                        statistics.median(walls) <= GOAL_S if not quick else None, shown))
        rows.append(row(f"--workers {n}: CPU seconds, median (min-max {min(cpus):.0f}-{max(cpus):.0f})",
                        statistics.median(cpus), command=shown))
    if len(workers) > 1:
        base = statistics.median(w for w, _ in times[workers[0]])
        for n in workers[1:]:
            rows.append(row(f"wall speed-up of --workers {n} over --workers {workers[0]}",
                            base / statistics.median(w for w, _ in times[n])))
    return rows


def run(quick: bool = False, source: Path | None = None) -> list[dict]:
    source = source if source is not None else _from_arg()
    if source is None and _arg("--workers"):
        return compare_workers(quick, [int(x) for x in _arg("--workers").split(",")], int(_arg("--repeat") or 1))
    cmd = ["rcomp", "demo", *(["--quick"] if quick else []), "--no-plot"]
    wall = cpu = None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(source) if source else Path(tmp) / "demo"
        if source is None:
            wall, cpu = _demo(cmd, out)
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
                                  "help": "read a finished demo folder instead of running the demo"},
                       "--workers": {"metavar": "N,M", "default": None,
                                     "help": "compare rcomp demo --workers N, M, ... (wall and CPU medians)"},
                       "--repeat": {"metavar": "K", "type": int, "default": 1,
                                    "help": "runs per --workers value (median and spread)"}})
