"""Distributed: `torchrun --nproc-per-node 2` (gloo, 1 thread each) against one process (2 threads) on the
same total work (convnet8 on digits at 1x28x28, 3 epochs, global batch 128). No target on 2 cores:
the ratio says what the process and all-reduce overhead costs here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, row  # noqa: E402

ARGS = ["finetune", "--arch", "convnet8", "--input-shape", "1,28,28", "--data", "digits", "--epochs", "3",
        "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.05", "--force"]


def _time(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run(quick: bool = False) -> list[dict]:
    tmp = Path(tempfile.mkdtemp())
    args = list(ARGS)
    if quick:
        args[args.index("3")] = "1"
    single = [sys.executable, "-m", "rcomp", *args, "-o", str(tmp / "one.safetensors")]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "rcomp", *args, "-o", str(tmp / "two.safetensors")]
    reps = 1 if quick else 2
    t1 = min(_time(single, 2) for _ in range(reps))
    t2 = min(_time(ddp, 1) for _ in range(reps))
    cmd = "python benchmarks/bench_distributed.py" + (" --quick" if quick else "")
    return [row("1 process, 2 threads, wall time incl. start-up (s)", t1, command=cmd),
            row("torchrun 2 gloo processes, 1 thread each, wall time (s)", t2, command=cmd),
            row("2 processes / 1 process (x)", t2 / t1, "report only (2 cores)", None, cmd)]


if __name__ == "__main__":
    main(run)
