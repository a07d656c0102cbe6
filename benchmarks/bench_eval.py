"""Evaluation: `bench` throughput (clean + FGSM + PGD-10) and peak memory as -n grows (fake data).

Each n runs in a fresh process so its peak RSS is its own. Target: flat memory (peak RSS at the
largest n within 10% of the smallest).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, row  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
from rcomp.evaluation.bench import bench, build_attacks
ckpt, n = sys.argv[1], int(sys.argv[2])
attacks = build_attacks(["fgsm", "pgd"], ["8/255"], lenient=True)
t0 = time.perf_counter()
res = bench([ckpt], "fake", attacks, n=n, progress=False, latency_batches=())
dt = time.perf_counter() - t0
print(json.dumps({"n": res["n"], "seconds": dt, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(quick: bool = False) -> list[dict]:
    import torch

    from rcomp.io.checkpoint import save
    from rcomp.models.registry import build_model

    tmp = Path(tempfile.mkdtemp())
    ckpt = tmp / "convnet8.safetensors"
    torch.manual_seed(0)
    save(build_model("convnet8", 10, (3, 32, 32)), ckpt)
    sizes = [500, 2000] if quick else [1000, 10000]
    out = []
    for n in sizes:
        r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(n)], capture_output=True, text=True,
                           check=True)
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cmd = f"python benchmarks/bench_eval.py{' --quick' if quick else ''} (convnet8 3x32x32, fake data, fgsm+pgd-10)"
    rows = []
    for o in out:
        rows.append(row(f"bench throughput at n={o['n']} (examples/s; random-init model, so most points are wrong clean and skip the attacks)", o["n"] / o["seconds"],
                        command=cmd))
        rows.append(row(f"peak RSS at n={o['n']} (MB)", o["peak_mb"], command=cmd))
    ratio = out[-1]["peak_mb"] / out[0]["peak_mb"]
    rows.append(row(f"peak memory n={out[-1]['n']} / n={out[0]['n']}", ratio, "<= 1.1 (flat)", ratio <= 1.1, cmd))
    return rows


if __name__ == "__main__":
    main(run)
