"""`torchrun --nproc-per-node 2 -m rcomp finetune` (gloo, CPU) against single-process training.

"The same" means: with --batch-size as the global batch, both runs take the same optimizer
steps on the same examples (each process gets half of every global batch, its loss weighted so
that DDP's averaged gradient is the global mean gradient). convnet8 has no BatchNorm, so the
weights agree up to floating-point summation order (SGD: Adam's first steps are nearly
sign(g) and would amplify rounding differences of gradients that are close to zero): we check they are within 1e-4 and that the
recorded training loss agrees to 1e-4.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ARGS = ["finetune", "--arch", "convnet8", "--data", "digits", "--epochs", "1", "-n", "800", "--batch-size", "64",
        "--optimizer", "sgd", "--lr", "0.05", "--eval-n", "64", "--seed", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(cli, tmp_path):
    single = tmp_path / "single.safetensors"
    res = cli(*ARGS, "-o", single)
    assert res.code == 0, res.stderr

    ddp = tmp_path / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "rcomp", *ARGS, "-o", str(ddp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(ddp)  # only rank 0 prints (one line)
    assert proc.stderr.count("wrote ") == 1
    a, b = load_file(str(single)), load_file(str(ddp))
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-4, diff
    with safe_open(str(ddp), "pt") as f:
        h = json.loads(f.metadata()["rcomp.history"])[-1]
    with safe_open(str(single), "pt") as f:
        h1 = json.loads(f.metadata()["rcomp.history"])[-1]
    assert h["params"]["processes"] == 2 and h1["params"]["processes"] == 1
    assert abs(h["metrics"]["epochs"][0]["loss"] - h1["metrics"]["epochs"][0]["loss"]) < 1e-4
    assert not torch.equal(a["net.classifier.3.weight"], torch.zeros_like(a["net.classifier.3.weight"]))
