"""Reliability: bad options on every command, faults while writing, determinism."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def ckpt(trained_digits) -> Path:
    return trained_digits


# ---------------------------------------------------------------------------------------------
# bad options, table-driven: each is one line on stderr, exit 2, nothing written
# ---------------------------------------------------------------------------------------------

BAD = [
    # (command + args, words the message must contain); "{ck}" is the checkpoint, "{out}" a fresh output
    (["prune", "{ck}", "--ratio", "0", "-o", "{out}"], "ratio"),
    (["prune", "{ck}", "--ratio", "1", "-o", "{out}"], "ratio"),
    (["prune", "{ck}", "--ratio", "-0.5", "-o", "{out}"], "ratio"),
    (["prune", "{ck}", "--ratio", "half", "-o", "{out}"], "ratio"),
    (["prune", "{ck}", "--ratio", "0.5", "--ignore", "no.such.layer", "-o", "{out}"], "no.such.layer"),
    (["prune", "{ck}", "--ratio", "0.5", "--method", "taylor", "--data", "imagefolder", "-o", "{out}"], "data-dir"),
    (["prune", "{ck}", "--ratio", "0.5", "--method", "magic", "-o", "{out}"], "method"),
    (["quantize", "{ck}", "--bits", "0", "--data", "digits", "-o", "{out}"], "bits"),
    (["quantize", "{ck}", "--bits", "32", "--data", "digits", "-o", "{out}"], "bits"),
    (["quantize", "{ck}", "--bits", "x", "--data", "digits", "-o", "{out}"], "bits"),
    (["quantize", "{ck}", "--simulate", "--bits", "1", "--data", "digits", "-o", "{out}"], "bits"),
    (["finetune", "{ck}", "--data", "digits", "--epochs", "0", "-o", "{out}"], "epochs"),
    (["finetune", "{ck}", "--data", "digits", "--epochs", "1", "--lr", "-1", "-o", "{out}"], "lr"),
    (["finetune", "{ck}", "--data", "digits", "--epochs", "1", "--adv", "magic", "-o", "{out}"], "adv"),
    (["finetune", "{ck}", "--data", "digits", "--epochs", "1", "--batch-size", "0", "-o", "{out}"], "batch"),
    (["finetune", "{ck}", "--data", "nodata", "--epochs", "1", "-o", "{out}"], "nodata"),
    (["attack", "{ck}", "--data", "digits", "--attack", "pgd", "--eps", "8/0"], "eps"),
    (["attack", "{ck}", "--data", "digits", "--attack", "pgd", "--eps", "abc"], "eps"),
    (["attack", "{ck}", "--data", "digits", "--attack", "pgd", "--eps", "-0.1"], "eps"),
    (["attack", "{ck}", "--data", "digits", "--attack", "pgd", "--eps", "1.5"], "eps"),
    (["attack", "{ck}", "--data", "digits", "--attack", "pgd", "--eps", "0.1", "--steps", "0"], "steps"),
    (["attack", "{ck}", "--data", "digits", "--attack", "nope", "--eps", "0.1"], "nope"),
    (["attack", "{ck}", "--data", "digits", "--attack", "pgd", "--eps", "0.1", "--norm", "l7"], "norm"),
    (["attack", "{ck}", "--data", "cifar100", "--data-dir", "{tmp}", "--attack", "pgd", "--eps", "0.1"], "cifar"),
    (["bench", "{ck}", "--data", "digits", "--attack", "pgd", "--eps", "0.1", "--format", "xml"], "format"),
    (["bench", "{ck}", "--data", "digits", "--attack", "pgd", "--eps", "0.1", "--fail-under", "clean=abc"], "fail-under"),
    (["info", "{tmp}"], "directory"),
    (["info", "{tmp}/missing.safetensors"], "does not exist"),
    (["prune", "{ck}", "--ratio", "0.5", "-o", "{ck}", "--force"], "input"),
    (["prune", "{ck}", "--ratio", "0.5", "-o", "{existing}"], "--force"),
    (["prune", "{ck}", "--ratio", "0.5", "-o", "{tmp}"], "directory"),
    (["finetune", "{ck}", "--data", "digits", "--epochs", "1", "--device", "tpu", "-o", "{out}"], "device"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a[:1] + a[2:5]) for a, _ in BAD])
def test_bad_options(tmp_path, ckpt, args, needle):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    out = tmp_path / "out.safetensors"
    argv = [a.format(ck=ckpt, out=out, tmp=tmp_path, existing=existing) for a in args]
    before = ckpt.read_bytes()
    res = run_cli(*argv)
    assert_one_line_error(res, needle)
    assert not out.exists()
    assert existing.read_bytes() == b"keep me"
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors"]


# ---------------------------------------------------------------------------------------------
# faults while writing
# ---------------------------------------------------------------------------------------------

def _child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_during_write_leaves_old_file_or_nothing(tmp_path, ckpt, sig):
    """Kill `rcomp prune` while it writes (the writer is slowed down): the output path holds either
    nothing or the complete previous file, never a partial one."""
    out = tmp_path / "out.safetensors"
    previous = b"previous complete file"
    out.write_bytes(previous)
    code = (
        # a child started from a non-interactive background job inherits SIGINT ignored: restore
        # Python's default (KeyboardInterrupt), which is what a user's Ctrl-C meets
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import sys, time, rcomp.io.atomic as a\n"
        "orig = a.atomic_write_bytes\n"
        "def slow(path, data):\n"
        "    def writer(fh):\n"
        "        fh.write(data[:100]); fh.flush(); print('WRITING', file=sys.stderr, flush=True); time.sleep(30)\n"
        "        fh.write(data[100:])\n"
        "    return orig(path, writer)\n"
        "a.atomic_write_bytes = slow\n"
        "from rcomp.cli import main\n"
        f"main(['prune', {str(ckpt)!r}, '--ratio', '0.5', '-o', {str(out)!r}, '--force'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=_child_env())
    deadline = time.time() + 120
    for line in proc.stderr:
        if "WRITING" in line or time.time() > deadline:
            break
    proc.send_signal(sig)
    rc = proc.wait(30)
    assert rc != 0
    assert out.read_bytes() == previous
    if sig == signal.SIGINT:  # a clean interrupt also removes its temporary file
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_full_disk_gives_clear_error_and_no_file(tmp_path, ckpt, monkeypatch):
    import rcomp.io.atomic as atomic

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.fh, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    out = tmp_path / "out.safetensors"
    res = run_cli("prune", ckpt, "--ratio", "0.5", "-o", out)
    assert res.code == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]  # progress logs come first; the error is one line
    assert last.startswith("rcomp: error:") and "No space left" in last and str(out) in last
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# determinism: same inputs and seed, same bytes
# ---------------------------------------------------------------------------------------------

def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("stage", [
    ["prune", "{ck}", "--ratio", "0.5", "--method", "l1"],
    ["prune", "{ck}", "--ratio", "0.3", "--method", "random", "--seed", "3"],
    ["quantize", "{ck}", "--data", "digits", "--calib-n", "64"],
    ["quantize", "{ck}", "--simulate", "--bits", "4", "--data", "digits", "--calib-n", "64"],
    ["finetune", "{ck}", "--data", "digits", "--epochs", "1", "-n", "256", "--adv", "fgsm", "--eps", "0.1",
     "--seed", "5"],
    ["attack", "{ck}", "--data", "digits", "-n", "64", "--attack", "pgd", "--eps", "0.1", "--steps", "3",
     "--seed", "5"],
])
def test_same_seed_same_bytes(tmp_path, ckpt, stage):
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.safetensors"
        res = run_cli(*[a.format(ck=ckpt) for a in stage], "-o", out)
        assert res.code == 0, res.stderr[-1500:]
        outs.append(out)
    assert _sha(outs[0]) == _sha(outs[1])


def test_bench_gives_identical_accuracies(ckpt):
    runs = []
    for _ in range(2):
        res = run_cli("bench", ckpt, "--data", "digits", "-n", "64", "--attack", "fgsm,pgd", "--eps", "0.1",
                      "--steps", "3", "--format", "json")
        assert res.code == 0, res.stderr[-1500:]
        m = json.loads(res.stdout)["models"][0]
        runs.append((m["clean_acc"], m["robust_acc"], m["worst_case_acc"]))
    assert runs[0] == runs[1]
