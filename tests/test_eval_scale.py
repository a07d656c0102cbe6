"""Evaluation at scale (issue 23), end to end: `rcomp run` recipes under torchrun, `bench` under torchrun,
and kill -9 + --resume at a chosen moment. Every torchrun here is `--standalone` (a free port picked at run
time: safe under xdist)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import rcomp

REPO = Path(rcomp.__file__).resolve().parents[1]
FAST_AUTO = {"attack": "auto", "steps": 3, "queries": 30, "targets": 2}
TIMINGS = {"seconds", "examples_per_s", "eval_seconds", "latency", "latency_ms", "thread_policy", "output",
           "records", "result", "path"}
RECORD_KEYS = ("index", "label", "clean_correct", "stage", "norm", "attacked", "robust", "attack_norm")


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def torchrun(*args, nproc: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "rcomp", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), stdin=subprocess.DEVNULL, timeout=timeout)


def _strip(d):
    """A report without its timings (and the paths, which name each run's folder)."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in TIMINGS}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _tensors(path: Path) -> dict:
    from rcomp.io.serialize import load_tensors

    return load_tensors(path)


def _same_chunks(a: Path, b: Path, keys=RECORD_KEYS) -> None:
    ca, cb = sorted(a.glob("chunk-*")), sorted(b.glob("chunk-*"))
    assert ca and [p.name for p in ca] == [p.name for p in cb]
    for x, y in zip(ca, cb, strict=True):
        tx, ty = _tensors(x), _tensors(y)
        for k in keys:
            assert torch.equal(tx[k], ty[k]), (x.name, k)


# ---------------------------------------------------------------------------
# rcomp run under torchrun: attack and bench stages split, the rest in rank 0 alone
# ---------------------------------------------------------------------------

def _recipe(tmp_path: Path, ckpt: Path) -> Path:
    common = {"data": "digits", "n": 40, "batch-size": 8, "eps": 0.1, "seed": 0}
    stages = [
        {"name": "pruned", "command": "prune", "input": str(ckpt), "options": {"ratio": 0.3}},
        {"name": "att", "command": "attack", "input": "pruned", "options": {**common, **FAST_AUTO},
         "output": "att.safetensors"},
        {"name": "cmp", "command": "bench", "inputs": [str(ckpt), "pruned"],
         "options": {**common, "attack": "fgsm,square", "queries": 20, "latency-batch": 0, "format": "json"},
         "output": "cmp.json"},
        # pgd draws per call, so in a cascade rank 0 runs it alone, with the figures of one process
        {"name": "pgd", "command": "bench", "input": "pruned",
         "options": {**common, "n": 16, "attack": "fgsm,pgd", "cascade": True, "steps": 2, "latency-batch": 0,
                     "format": "json"},
         "output": "pgd.json"},
    ]
    p = tmp_path / "scale.yaml"
    p.write_text(yaml.safe_dump({"name": "scale", "stages": stages}, sort_keys=False))
    return p


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
def test_recipe_under_torchrun_equals_one_process(cli, trained_digits, tmp_path):
    recipe = _recipe(tmp_path, trained_digits)
    one = cli("run", recipe, "--out-dir", tmp_path / "one", "--json")
    assert one.code == 0, one.stderr
    two = torchrun("run", recipe, "--out-dir", tmp_path / "two", "--json")
    assert two.returncode == 0, two.stderr[-4000:]
    stages = json.loads(two.stdout)["stages"]  # rank 0 alone prints
    assert [s["status"] for s in stages] == ["ran"] * 4
    assert "att: split over 2 processes" in two.stderr and "cmp: split over 2 processes" in two.stderr
    assert "pgd: runs in rank 0 alone: pgd draw(s) random numbers per call, and in a cascade" in two.stderr
    assert two.stderr.count("[1/4] pruned:") == 1  # one process logs
    assert "resuming" not in two.stderr  # the split stages' fresh records folders are no resume
    # the same files, and nothing else (no records folder, no temp file, one stamp per stage)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    stamps = sorted(p.name for p in (tmp_path / "two" / ".rcomp-run").iterdir())
    assert stamps == ["att.json", "cmp.json", "pgd.json", "pruned.json"]
    for name in ("cmp.json", "pgd.json"):
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("one", "two"))
        assert _strip(a) == _strip(b), name
    ta, tb = _tensors(tmp_path / "one" / "att.safetensors"), _tensors(tmp_path / "two" / "att.safetensors")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (tmp_path / "one" / "pruned.safetensors").read_bytes() == (tmp_path / "two" / "pruned.safetensors").read_bytes()
    # the stamps are those of one process: a 1-process rerun skips every stage, and so does a torchrun one
    rerun = cli("run", recipe, "--out-dir", tmp_path / "two", "--json")
    assert [s["status"] for s in json.loads(rerun.stdout)["stages"]] == ["skipped"] * 4
    again = torchrun("run", recipe, "--out-dir", tmp_path / "two", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [s["status"] for s in json.loads(again.stdout)["stages"]] == ["skipped"] * 4


@pytest.mark.slow
def test_recipe_under_torchrun_refuses_once_and_writes_nothing(trained_digits, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "stages": [
        {"name": "a", "command": "attack", "input": str(trained_digits),
         "options": {"data": "digits", "attack": "fgsm", "eps": 0.1, "nope": 1}}]}))
    res = torchrun("run", bad, "--out-dir", tmp_path / "out")
    assert res.returncode != 0 and "nope" in res.stderr
    assert res.stderr.count("rcomp: error:") == 1  # said once, not once per process
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# bench under torchrun (issue 23 point 3)
# ---------------------------------------------------------------------------

BENCH = ("--data", "digits", "-n", "40", "--batch-size", "8", "--eps", "0.1", "--seed", "0", "--latency-batch", "0",
         "--json")


@pytest.mark.slow
def test_bench_two_gloo_processes_equal_one(cli, trained_digits, tmp_path):
    """Attacks drawing per call (pgd, apgd, cw, fgsm's random start, random targets: each process moves
    their streams on over the other's batches) and per point (square); `auto` under torchrun is
    test_eval_records' attack test."""
    from conftest import make_checkpoint

    other = make_checkpoint(tmp_path / "other.safetensors", seed=3)
    args = ("bench", trained_digits, other, *BENCH, "--attack", "pgd,apgd,cw,fgsm,square", "--random-start",
            "--targeted", "--steps", "3", "--queries", "20")
    one = cli(*args, "--records", tmp_path / "one")
    assert one.code == 0, one.stderr
    two = torchrun(*args, "--records", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert _strip(a) == _strip(b)
    assert a["models"][0]["worst_case_acc"] < a["models"][0]["clean_acc"]  # the attacks did something
    subs = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(subs) == 2 and subs == sorted(p.name for p in (tmp_path / "two").iterdir())
    # the same per-point results, and each per-call attack's stream counter where one process had it
    # (square draws per point: its counter counts only its own process's calls and draws nothing from it)
    for s in subs:
        _same_chunks(tmp_path / "one" / s, tmp_path / "two" / s)
        for c in sorted((tmp_path / "one" / s).glob("chunk-*")):
            ca, cb = _tensors(c)["calls"], _tensors(tmp_path / "two" / s / c.name)["calls"]
            assert torch.equal(ca[:4], cb[:4]), c.name
    # the progress of rank 0 counts every process's points, and says how fast they went
    finals = [ln for ln in two.stderr.splitlines() if "########] 40/40 " in ln]
    assert len(finals) == 2 and all(ln.endswith("/s") for ln in finals), two.stderr[-2000:]


def test_bench_pgd_then_auto_splits_over_two_processes_with_one_process_figures(cli, trained_digits, tmp_path):
    """The demo's judging bench: pgd draws per call but comes first in the cascade, so it runs on the points
    correct clean as in independent mode and every process can move its streams on; auto's stages draw per
    point. Before, the whole bench ran in rank 0 alone."""
    args = ("bench", trained_digits, *BENCH, "--attack", "pgd,auto", "--steps", "3", "--queries", "20")
    one = cli(*args, "--records", tmp_path / "one")
    assert one.code == 0, one.stderr
    two = torchrun(*args, "--records", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-4000:]
    assert "alone" not in two.stderr and "one process" not in two.stderr, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert _strip(a) == _strip(b)
    assert a["models"][0]["worst_case_acc"] < a["models"][0]["clean_acc"]  # the attacks did something
    (sub,) = [p.name for p in (tmp_path / "one").iterdir()]
    _same_chunks(tmp_path / "one" / sub, tmp_path / "two" / sub)
    for c in sorted((tmp_path / "one" / sub).glob("chunk-*")):  # pgd's stream counter where one process had it
        assert torch.equal(_tensors(c)["calls"][:1], _tensors(tmp_path / "two" / sub / c.name)["calls"][:1]), c.name


# ---------------------------------------------------------------------------
# kill -9 at a chosen moment, then --resume (issue 23 point 2)
# ---------------------------------------------------------------------------

# Runs the CLI in a child process that SIGKILLs itself at a set moment of writing its records: right
# after its K-th chunk is on disk ("after"), or with the K-th chunk's bytes in its temporary file but not
# yet published ("during"). The kill is a real kill -9; only its moment is chosen.
_KILLER = r"""
import os, signal, sys
from rcomp.evaluation import records
from rcomp.io import atomic

k, when = int(sys.argv[1]), sys.argv[2]
real_write, real_publish, count = records.RecordDir.write, atomic._publish, [0]

def die(*args, **kw):
    os.kill(os.getpid(), signal.SIGKILL)

def write(self, b, first, tensors):
    count[0] += 1
    if count[0] == k and when == "during":
        atomic._publish = die  # the chunk's bytes are in its temporary file, not yet published
    real_write(self, b, first, tensors)
    if count[0] == k and when == "after":
        die()

records.RecordDir.write = write
from rcomp.cli import main
main(sys.argv[3:])
"""


def _killed(tmp_path: Path, k: int, when: str, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    return subprocess.run([sys.executable, str(script), str(k), when, *map(str, args)], capture_output=True,
                          text=True, env=_env(), stdin=subprocess.DEVNULL, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after", "during"])
def test_bench_kill_9_then_resume_is_identical(cli, trained_digits, tmp_path, when):
    """Two models, killed in the middle of the second one's evaluation; --resume ends with the report and
    records of an uninterrupted run, and leaves no temporary file."""
    from conftest import make_checkpoint

    other = make_checkpoint(tmp_path / "other.safetensors", seed=3)
    args = ("bench", trained_digits, other, *BENCH, "--attack", "fgsm,square", "--queries", "20")
    whole = cli(*args, "--records", tmp_path / "whole")
    assert whole.code == 0, whole.stderr
    rec = tmp_path / "rec"
    # 5 batches per model: the 8th chunk written is the second model's third
    proc = _killed(tmp_path, 8, when, *args, "--records", rec)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(len(list(p.glob("chunk-*"))) for p in rec.iterdir()) == [2 if when == "during" else 3, 5]
    assert bool(list(rec.rglob(".chunk-*"))) == (when == "during")  # the temporary file of the chunk in flight
    resumed = cli(*args, "--records", rec, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert "already done" in resumed.stderr
    assert _strip(json.loads(resumed.stdout)) == _strip(json.loads(whole.stdout))
    for s in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        _same_chunks(tmp_path / "whole" / s, rec / s, (*RECORD_KEYS, "calls"))
    assert not [p for p in rec.rglob("*") if p.name.startswith(".")]  # no temp file left


@pytest.mark.slow
def test_attack_kill_9_after_the_first_chunk_then_resume_is_identical(cli, trained_digits, tmp_path):
    args = ("attack", trained_digits, "--data", "digits", "-n", "40", "--batch-size", "8", "--attack", "auto",
            "--steps", "3", "--queries", "30", "--targets", "2", "--eps", "0.1", "--seed", "0", "--json")
    whole = cli(*args, "--records", tmp_path / "whole", "-o", tmp_path / "whole.safetensors")
    assert whole.code == 0, whole.stderr
    rec = tmp_path / "rec"
    proc = _killed(tmp_path, 1, "after", *args, "--records", rec, "-o", tmp_path / "resumed.safetensors")
    assert proc.returncode == -9 and [p.name for p in rec.glob("chunk-*")] == ["chunk-000000.safetensors"]
    assert not (tmp_path / "resumed.safetensors").exists()
    resumed = cli(*args, "--records", rec, "-o", tmp_path / "resumed.safetensors", "--resume")
    assert resumed.code == 0, resumed.stderr
    assert _strip(json.loads(resumed.stdout)) == _strip(json.loads(whole.stdout))
    _same_chunks(tmp_path / "whole", rec, (*RECORD_KEYS, "calls", "adv", "clean"))
    ta, tb = _tensors(tmp_path / "whole.safetensors"), _tensors(tmp_path / "resumed.safetensors")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_rank_0_progress_counts_every_process_and_leaves_resumed_points_out_of_the_rate():
    import io

    from rcomp.evaluation.robustness import _Everyone
    from rcomp.progress import Progress

    class Store:  # the chunks on disk: rank 0 wrote 0 and 2, rank 1 wrote 1 and 3; 0 was read back (resumed)
        def batches(self):
            return {0, 1, 2, 3}

    bar = Progress(100, "attack", stream=io.StringIO())
    everyone = _Everyone(bar, Store(), {0: {"index": torch.arange(10)}}, 100)
    bar._t0 -= 10  # started 10 s ago
    for b in range(3):
        everyone.saw(b, 10)
    assert everyone.sync() == 4 and bar.n == 40  # batch 3, not seen yet by rank 0, counts as a full one
    line = bar.line()
    assert "40/100" in line and " 3.0/s" in line and "ETA 20s" in line, line


def test_engine_records_folders_are_dropped_by_stage_name_only(tmp_path):
    from rcomp.recipes.engine import RECORDS_DIR, _drop_records

    root = tmp_path / RECORDS_DIR
    for name in ("att-0123456789abcdef", "att-fedcba9876543210", "att-x-0123456789abcdef", "att-short", "mine"):
        (root / name).mkdir(parents=True)
        (root / name / "chunk-000000.safetensors").write_bytes(b"x")
    _drop_records(tmp_path, "att")
    assert sorted(p.name for p in root.iterdir()) == ["att-short", "att-x-0123456789abcdef", "mine"]
    _drop_records(tmp_path, "att-x")
    _drop_records(tmp_path, "mine")  # not an engine folder: kept
    assert sorted(p.name for p in root.iterdir()) == ["att-short", "mine"]


def test_a_planted_records_symlink_is_refused(cli, tmp_path, trained_digits):
    from rcomp.recipes.engine import RECORDS_DIR

    from conftest import assert_one_line_error

    recipe = _recipe(tmp_path, trained_digits)
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORDS_DIR).symlink_to(tmp_path)
    assert_one_line_error(cli("run", recipe, "--out-dir", out), "not a folder")
