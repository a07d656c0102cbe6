"""Evaluation at scale (issue 23): sharding over torchrun processes, kill -9 + --resume, thread
scaling, and memory as n grows, all on `rcomp attack --attack auto --records DIR`.

Questions, each answered by running the CLI in fresh processes:
1. Do 2 processes (torchrun, gloo, 1 thread each) give the results of 1 process, point by point?
2. Does kill -9 at a random batch, then --resume, end identical to an uninterrupted run?
3. Scaling: 2 processes x 1 thread against 1 process x 2 threads (points/s).
4. Peak memory (RSS of the evaluating process) at the large n against the small n (target: within 10%).

The model is convnet8 on the synthetic `fake` data (3x32x32, 10,000 test points), trained briefly
so that most points are correct clean and attacked. Full size is slow on a loaded 2-core machine:
`--n 2000 --n-small 1000 --n-large 10000` are the issue's sizes; `--quick` runs a small version.

    python benchmarks/bench_eval_scale.py --quick
    python benchmarks/bench_eval_scale.py --n 2000 --n-small 1000 --n-large 10000 --steps 100
    python benchmarks/bench_eval_scale.py --only memory --steps 1 --queries 1 --targets 1   # one question
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import JSON_PREFIX, print_table, row  # noqa: E402

_RSS = r"""
import resource, sys
from rcomp.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = 0
print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)
sys.exit(code or 0)
"""


def _train(ckpt: Path) -> None:
    import torch
    import torch.nn.functional as F

    from rcomp.data.registry import data_info, get_dataset, make_loader
    from rcomp.models.loading import save
    from rcomp.models.registry import build_model

    torch.manual_seed(0)
    info = data_info("fake")
    model = build_model("convnet8", 10, info.shape, list(info.mean), list(info.std), dataset="fake")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for x, y in make_loader(get_dataset("fake", "train", model.meta.input), 64, shuffle=True, seed=0):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    save(model.eval(), ckpt)


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(Path(__file__).resolve().parents[1]))


def _attack_args(ckpt: Path, n: int, a: argparse.Namespace, records: Path) -> list[str]:
    return ["attack", str(ckpt), "--data", "fake", "-n", str(n), "--batch-size", str(a.batch_size), "--attack", "auto",
            "--eps", "8/255", "--steps", str(a.steps), "--queries", str(a.queries), "--targets", str(a.targets),
            "--seed", "0", "--json",
            "--device", "cpu", "--records", str(records)]


def _run(args: list[str], threads: int, procs: int = 1) -> tuple[dict, float, float | None]:
    if procs == 1:
        cmd = [sys.executable, "-c", _RSS, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "rcomp", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    peak = [float(ln.split()[1]) for ln in p.stderr.splitlines() if ln.startswith("PEAK_MB")]
    return json.loads(p.stdout), dt, (peak[0] if peak else None)


def _figures(d: dict) -> dict:
    drop = {"seconds", "examples_per_s", "records", "output"}
    if isinstance(d, dict):
        return {k: _figures(v) for k, v in d.items() if k not in drop}
    return d


def _same_points(a: Path, b: Path) -> bool:
    import torch

    from rcomp.io.serialize import load_tensors

    ca, cb = sorted(a.glob("chunk-*")), sorted(b.glob("chunk-*"))
    if [p.name for p in ca] != [p.name for p in cb]:
        return False
    keys = ("index", "label", "clean_correct", "stage", "norm", "attacked", "robust", "attack_norm")
    return all(torch.equal(load_tensors(x)[k], load_tensors(y)[k]) for x, y in zip(ca, cb, strict=True) for k in keys)


def _killed_and_resumed(ckpt: Path, a: argparse.Namespace, rec: Path) -> tuple[dict, int]:
    batches = -(-a.n // a.batch_size)
    stop = random.Random(a.seed).randint(1, max(1, batches - 1))
    args = _attack_args(ckpt, a.n, a, rec)
    p = subprocess.Popen([sys.executable, "-m", "rcomp", *args], env=_env(1), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while len(list(rec.glob("chunk-*"))) < stop and p.poll() is None:
        time.sleep(0.01)
    p.kill()
    p.wait()
    done = len(list(rec.glob("chunk-*")))
    out, _, _ = _run([*args, "--resume"], 1)
    return out, done


QUESTIONS = ("identity", "resume", "threads", "memory")


def _load() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="points for questions 1-3")
    ap.add_argument("--n-small", type=int, default=1000)
    ap.add_argument("--n-large", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=100, help="APGD steps (auto's default 100)")
    ap.add_argument("--queries", type=int, default=1000, help="Square queries (auto's default 1000)")
    ap.add_argument("--targets", type=int, default=4, help="APGD-T target classes (auto's default 4)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="picks the batch the kill lands after")
    ap.add_argument("--only", default=",".join(QUESTIONS),
                    help=f"comma list of questions to answer: {', '.join(QUESTIONS)} (default all)")
    ap.add_argument("--quick", action="store_true", help="--n 256 --n-small 256 --n-large 1024 --steps 5 --queries 20")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line (benchmarks/run.py)")
    a = ap.parse_args()
    if a.quick:
        a.n, a.n_small, a.n_large, a.steps, a.queries, a.batch_size = 256, 256, 1024, 5, 20, 64
    only = {q.strip() for q in a.only.split(",") if q.strip()}
    if only - set(QUESTIONS):
        raise SystemExit(f"--only takes {', '.join(QUESTIONS)}")
    cmd = " ".join(["python benchmarks/bench_eval_scale.py", *sys.argv[1:]])
    tmp = Path(tempfile.mkdtemp())
    t_all, load_before = time.perf_counter(), _load()
    rows = []
    try:
        ckpt = tmp / "convnet8.safetensors"
        _train(ckpt)
        one = t1 = None
        if only & {"identity", "resume", "threads"}:
            one, t1, _ = _run(_attack_args(ckpt, a.n, a, tmp / "one"), 1)
            rows.append(row(f"auto at n={a.n}: clean / robust accuracy",
                            f"{one['clean_acc']:.4f} / {one['worst_case_acc']:.4f}", command=cmd))
        if only & {"identity", "threads"}:
            two, t2, _ = _run(_attack_args(ckpt, a.n, a, tmp / "two"), 1, procs=2)
            same2 = _figures(one) == _figures(two) and _same_points(tmp / "one", tmp / "two")
            rows.append(row("2 processes equal 1, figures and per-point records", same2, "True", same2, cmd))
        if "resume" in only:
            resumed, killed_at = _killed_and_resumed(ckpt, a, tmp / "killed")
            same_r = _figures(one) == _figures(resumed) and _same_points(tmp / "one", tmp / "killed")
            rows.append(row(f"kill -9 after {killed_at} batch(es), --resume: identical", same_r, "True", same_r, cmd))
        if "threads" in only:
            thr, t12, _ = _run(_attack_args(ckpt, a.n, a, tmp / "thr"), 2)
            rows += [row("points/s, 1 process x 1 thread", a.n / t1, command=cmd),
                     row("points/s, 2 processes x 1 thread (torchrun, gloo)", a.n / t2, command=cmd),
                     row("points/s, 1 process x 2 threads", a.n / t12, command=cmd),
                     row("1 process x 2 threads: same figures as 1 thread", _figures(thr) == _figures(one),
                         command=cmd)]
        if "memory" in only:
            _, _, m_small = _run(_attack_args(ckpt, a.n_small, a, tmp / "small"), 1)
            _, _, m_large = _run(_attack_args(ckpt, a.n_large, a, tmp / "large"), 1)
            rows += [row(f"peak RSS MB at n={a.n_small} / n={a.n_large}", f"{m_small:.0f} / {m_large:.0f}",
                         command=cmd),
                     row(f"peak RSS n={a.n_large} / n={a.n_small}", m_large / m_small, "<= 1.1",
                         m_large / m_small <= 1.1, cmd)]
        rows.append(row("wall time of this run (s); load average 1/5/15 min before -> after",
                        f"{time.perf_counter() - t_all:.0f}; {load_before} -> {_load()}", command=cmd))
        if a.json:
            print(JSON_PREFIX + json.dumps(rows))
        else:
            print_table(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
