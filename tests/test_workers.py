"""`rcomp run --workers N` / `rcomp demo --workers N`: a recipe in N local processes (issue 25): the files of a
one-process run, independent stages side by side, a failure said once, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as hs

from conftest import assert_one_line_error

# two independent fine-tuning runs from one base, then a bench of both (split over the workers), then a bench
# of the better one
TINY = {"name": "tiny", "defaults": {"data": "digits", "seed": 0}, "stages": [
    {"name": "base", "command": "finetune",
     "options": {"arch": "convnet8", "input-shape": "1,8,8", "epochs": 1, "batch-size": 64, "eval-n": 0}},
    {"name": "ft-{adv}", "command": "finetune", "input": "base", "grid": {"adv": ["none", "fgsm"]},
     "options": {"epochs": 1, "steps-budget": 6, "adv": "{adv}", "eps": 0.1, "batch-size": 32, "eval-n": 0}},
    {"name": "bench", "command": "bench", "inputs": ["ft-*"],
     "options": {"attack": "fgsm", "eps": 0.1, "n": 32, "latency-batch": 0, "format": "json"},
     "output": "bench.json"},
    {"name": "judge", "command": "bench", "inputs": [{"best": ["ft-none", "ft-fgsm"], "by": "bench"}],
     "options": {"attack": "pgd", "eps": 0.1, "n": 32, "latency-batch": 0, "format": "json"},
     "output": "judge.json"},   # the better of the two by bench, chosen by rank 0 at run time
]}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _stages(res) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "seconds"} for s in json.loads(res.stdout)["stages"]]


def _figures(bench: Path) -> list:
    return [(m["name"], m["clean_acc"], m["robust_acc"], m["worst_case_acc"]) for m in
            json.loads(bench.read_text())["models"]]


@pytest.mark.slow
def test_two_workers_write_the_files_of_one_process_and_a_rerun_skips(cli, tmp_path, monkeypatch):
    recipe = _write(tmp_path / "tiny.yaml", TINY)
    runs = {}
    for n in (1, 2):  # the same relative --out-dir from two folders: the files record the same paths
        (tmp_path / f"w{n}").mkdir()
        monkeypatch.chdir(tmp_path / f"w{n}")
        runs[n] = cli("run", recipe, "--out-dir", "out", "--json", "--workers", n)
        assert runs[n].code == 0, runs[n].stderr[-3000:]
    one, two = tmp_path / "w1" / "out", tmp_path / "w2" / "out"
    assert _stages(runs[1]) == _stages(runs[2])  # rank 0 alone printed, the records of one process
    assert "running 2 worker processes" in runs[2].stderr
    for name in ("base", "ft-none", "ft-fgsm"):
        assert (one / f"{name}.safetensors").read_bytes() == (two / f"{name}.safetensors").read_bytes(), name
    assert _figures(one / "bench.json") == _figures(two / "bench.json")
    assert _figures(one / "judge.json") == _figures(two / "judge.json") and len(_figures(two / "judge.json")) == 1
    assert runs[2].stderr.count("judge: best of ft-none") == 1
    # the two fine-tuning runs ran side by side, their lines named; every stage logged once
    err = runs[2].stderr
    assert "[ft-none] wrote" in err and "[ft-fgsm] wrote" in err and "bench: split over 2 processes" in err
    assert [err.count(f"] {s}: rcomp") for s in ("base", "ft-none", "ft-fgsm", "bench", "judge")] == [1] * 5
    # the same files and stamps as one process, nothing else (no records folder, no temporary file)
    assert sorted(p.name for p in one.rglob("*")) == sorted(p.name for p in two.rglob("*"))
    for stamp in (one / ".rcomp-run").iterdir():  # bench.json holds timings: its sha256 differs run to run
        a, b = (json.loads(p.read_text()) for p in (stamp, two / ".rcomp-run" / stamp.name))
        skip = {"seconds", *(["output_sha256"] if stamp.name in ("bench.json", "judge.json") else [])}
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    # a second run, in workers or not, skips every finished stage
    again = cli("run", recipe, "--out-dir", "out", "--json", "--workers", 2)
    assert again.code == 0, again.stderr[-2000:]
    assert [s["status"] for s in _stages(again)] == ["skipped"] * 5
    # a stage split over the workers that fails in rank 0 (--fail-under, checked there) is said once, exit 1
    low = cli("run", recipe, "--out-dir", "out", "--workers", 2, "--set", "bench.fail-under=clean=0.99")
    assert low.code == 1, low.stderr[-3000:]
    assert [ln for ln in low.stderr.splitlines() if ln.startswith("rcomp:")] == [
        ln for ln in low.stderr.splitlines() if ln.startswith("rcomp: error: stage bench (line")]
    assert low.stderr.count("rcomp: error:") == 1 and "Traceback" not in low.stderr
    monkeypatch.chdir(tmp_path / "w1")
    assert [s["status"] for s in _stages(cli("run", recipe, "--out-dir", "out", "--json"))] == ["skipped"] * 5
    # a choice rank 0 cannot make (its bench's JSON broken, though stamped as done) stops every worker, said once
    from rcomp.io.header import sha256_file

    (two / "bench.json").write_text("{not json")
    stamp = two / ".rcomp-run" / "bench.json"
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "output_sha256": sha256_file(two / "bench.json")}))
    monkeypatch.chdir(tmp_path / "w2")
    broken = cli("run", recipe, "--out-dir", "out", "--workers", 2)
    errors = [ln for ln in broken.stderr.splitlines() if ln.startswith("rcomp: error:")]
    assert broken.code == 2 and "Traceback" not in broken.stderr, broken.stderr[-2000:]
    assert len(errors) == 1 and "stage judge (line" in errors[0] and "is not a bench JSON" in errors[0], errors


@pytest.mark.slow
def test_a_stage_failing_in_a_worker_is_said_once(cli, tmp_path):
    """A fine-tuning run that diverges (adam, lr 10), run beside a good one in the other worker: exit 1, the
    stage's one line once, its file not written; the good stage's file and stamp stay for the rerun."""
    doc = {"name": "bad", "defaults": {"data": "digits", "seed": 0, "arch": "convnet8", "input-shape": "1,8,8",
                                        "batch-size": 64, "eval-n": 0}, "stages": [
        {"name": "good", "command": "finetune", "options": {"epochs": 1, "steps-budget": 8}},
        {"name": "boom", "command": "finetune", "options": {"epochs": 1, "steps-budget": 4, "lr": 10,
                                                             "optimizer": "adam"}},
    ]}
    recipe = _write(tmp_path / "bad.yaml", doc)
    out = tmp_path / "out"
    res = cli("run", recipe, "--out-dir", out, "--workers", 2)
    assert res.code == 1, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("rcomp:")]
    assert len(errors) == 1 and errors[0].startswith("rcomp: error: stage boom (line"), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (out / "boom.safetensors").exists() and (out / "good.safetensors").exists()
    assert sorted(p.name for p in (out / ".rcomp-run").iterdir()) == ["good.json"]
    assert not list(out.rglob("*rcomp-tmp*"))
    # one process says the same line
    alone = cli("run", recipe, "--out-dir", tmp_path / "alone")
    assert alone.code == 1 and [ln for ln in alone.stderr.splitlines() if ln.startswith("rcomp:")] == errors


@pytest.mark.slow
def test_a_stage_starts_when_what_it_reads_is_done_not_after_its_wave(cli, tmp_path):
    """Two workers: a long run and a short chain (quick -> child). The child starts while the long run still
    trains (waves would have held it until the long run ended), and the files are those of one process."""
    new = {"arch": "convnet8", "input-shape": "1,8,8"}
    doc = {"name": "chain", "defaults": {"data": "digits", "seed": 0, "batch-size": 64, "eval-n": 0}, "stages": [
        {"name": "slow", "command": "finetune", "options": {**new, "epochs": 5, "steps-budget": 50, "adv": "pgd",
                                                             "eps": 0.1, "steps": 3}},
        {"name": "quick", "command": "finetune", "options": {**new, "epochs": 1, "steps-budget": 2}},
        {"name": "child", "command": "finetune", "input": "quick", "options": {"epochs": 1, "steps-budget": 2}},
    ]}
    recipe = _write(tmp_path / "chain.yaml", doc)
    res = cli("run", recipe, "--out-dir", tmp_path / "two", "--workers", 2)
    assert res.code == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    child_starts = next(i for i, ln in enumerate(lines) if "] child: rcomp finetune" in ln)
    slow_ends = next(i for i, ln in enumerate(lines) if ln.startswith("[slow] wrote"))
    assert child_starts < slow_ends, res.stderr[-3000:]
    one = cli("run", recipe, "--out-dir", tmp_path / "one", "--workers", 1)
    assert one.code == 0, one.stderr[-2000:]
    from safetensors.torch import load_file

    for name in ("slow", "quick", "child"):  # the same weights (the files record their folders' paths)
        a, b = (load_file(str(tmp_path / d / f"{name}.safetensors")) for d in ("one", "two"))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), name


@pytest.mark.parametrize("value,needle", [("0", "--workers"), ("-1", "--workers"), ("two", "--workers"),
                                          ("1.5", "--workers")])
@pytest.mark.parametrize("command", ["run", "demo"])
def test_bad_workers_values_are_refused_in_one_line(cli, tmp_path, value, needle, command):
    recipe = _write(tmp_path / "tiny.yaml", TINY)
    args = ["run", recipe] if command == "run" else ["demo"]
    res = cli(*args, "--out-dir", tmp_path / "out", "--workers", value)
    assert_one_line_error(res, needle)
    assert not (tmp_path / "out").exists()


def test_workers_under_torchrun_is_refused(cli, tmp_path, monkeypatch):
    recipe = _write(tmp_path / "tiny.yaml", TINY)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert_one_line_error(cli("run", recipe, "--out-dir", tmp_path / "out", "--workers", 2), "torchrun")
    assert not (tmp_path / "out").exists()


def test_a_refused_recipe_is_said_once_before_any_worker_starts(cli, tmp_path):
    doc = {"name": "r", "stages": [{"name": "a", "command": "prune", "input": "nowhere.safetensors",
                                    "options": {"ratio": 0.5}}]}
    res = cli("run", _write(tmp_path / "r.yaml", doc), "--out-dir", tmp_path / "out", "--workers", 2)
    assert_one_line_error(res, "nowhere.safetensors")
    assert "worker" not in res.stderr and not (tmp_path / "out").exists()


def test_dry_run_with_workers_prints_the_commands(cli, tmp_path):
    res = cli("run", _write(tmp_path / "tiny.yaml", TINY), "--out-dir", tmp_path / "out", "--workers", 2,
              "--dry-run")
    assert res.code == 0 and len(res.stdout.splitlines()) == 5 and "worker" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_threads_per_worker():
    from rcomp.recipes.workers import cores, threads_per_worker

    assert threads_per_worker(2, {"OMP_NUM_THREADS": "3"}) == "3"  # the user said
    assert threads_per_worker(2, {}) == str(max(1, cores() // 2))
    assert threads_per_worker(10**6, {}) == "1"


# ----- the schedule: levels; a level's alone stages taken as they become ready, then its benches -------

def _stage(name, deps, command="finetune", budget=None, adv="pgd", inputs=()):
    from types import SimpleNamespace

    from rcomp.recipes.engine import Stage

    st = Stage(name=name, command=command, options={}, inputs=list(deps), output=f"{name}.safetensors", line=0)
    st.deps = list(deps)
    st.input_paths = [str(p) for p in inputs]
    st.config = SimpleNamespace(batch_size=32, steps_budget=budget, epochs=1, adv=adv, steps=7, grad_align=0.0)
    return st


@settings(max_examples=80, deadline=None)
@given(hs.lists(hs.tuples(hs.lists(hs.integers(0, 30), max_size=3), hs.booleans()), min_size=1, max_size=12))
def test_levels_put_every_stage_after_what_it_reads(raw):
    """Alone stages read lower levels or alone stages of their own; a bench reads lower levels or alone
    stages of its own; every stage once, recipe order inside each group."""
    from rcomp.recipes.engine import _levels, together

    order = []
    for i, (ds, bench) in enumerate(raw):  # stage i reads earlier stages only: a topological order
        order.append(_stage(f"s{i}", sorted({f"s{d % i}" for d in ds}) if i else [],
                            command="bench" if bench else "finetune"))
    levels = _levels(order)
    flat = [st.name for alone, tog in levels for st in alone + tog]
    assert sorted(flat) == sorted(st.name for st in order) and len(flat) == len(set(flat))
    where = {st.name: (k, together(st)) for k, (alone, tog) in enumerate(levels) for st in alone + tog}
    for st in order:
        k, tog = where[st.name]
        for d in st.deps:
            dk, dtog = where[d]
            assert dk < k or (dk == k and not dtog), (st.name, d)  # never a bench of its own level
    for alone, tog in levels:
        assert all(not together(st) for st in alone) and all(together(st) for st in tog)
        for group in (alone, tog):
            assert [order.index(st) for st in group] == sorted(order.index(st) for st in group)
    # a chain without benches is one level: its stages start as soon as what they read is done, not in waves
    chain = [_stage("a", []), _stage("b", ["a"]), _stage("c", ["b"]), _stage("d", [])]
    assert [[st.name for st in alone] for alone, _ in _levels(chain)] == [["a", "b", "c", "d"]]


def test_costs_read_the_input_and_the_longest_chain_goes_first(cli, tmp_path, trained_digits):
    """A fine-tuning run of a pruned model costs less than one of its dense model at the same passes; a
    single-step run pays for its guard's checks; a stage's priority is its cost plus its longest chain after."""
    from rcomp.recipes.engine import PARAMS_UNKNOWN, _priorities, expected_cost

    pruned = tmp_path / "pruned.safetensors"
    assert cli("prune", trained_digits, "--ratio", "0.5", "--data", "digits", "-o", pruned).code == 0
    a = _stage("dense-ft", [], budget=90, inputs=[trained_digits])
    b = _stage("pruned-ft", [], budget=90, inputs=[pruned])
    missing = _stage("later-ft", [], budget=90, inputs=[tmp_path / "not-yet.safetensors"])
    assert expected_cost(b) < expected_cost(a)
    assert expected_cost(missing) == 90 * 32 * 8 * PARAMS_UNKNOWN
    single = _stage("fgsm-ft", [], budget=360, adv="n-fgsm", inputs=[tmp_path / "not-yet.safetensors"])
    assert expected_cost(single) > 360 * 32 * 2 * PARAMS_UNKNOWN  # the guard's checks are counted
    assert expected_cost(_stage("p", [], command="prune")) == 1.0
    # priorities: base -> long child beats a lone stage costlier than base alone
    base, child = _stage("base", [], budget=10), _stage("child", ["base"], budget=100)
    lone = _stage("lone", [], budget=50)
    prio = _priorities([base, child, lone])
    assert prio["base"] == expected_cost(base) + expected_cost(child) > prio["lone"] == expected_cost(lone)


def test_assign_balances_longest_first_and_pins_bench_to_rank_0():
    from rcomp.recipes.engine import assign

    stages = [_stage("short", [], budget=9), _stage("long", [], budget=90), _stage("mid", [], budget=36),
              _stage("b", [], command="bench")]
    owner = assign(stages, 2)
    assert owner == {"b": 0, "long": 1, "mid": 0, "short": 0}
    assert assign(stages, 2) == owner  # deterministic
    assert set(assign(stages, 1).values()) == {0}


def test_prefixed_stream_names_every_line():
    import io

    from rcomp.recipes.engine import _Prefixed

    sink = io.StringIO()
    s = _Prefixed(sink, "[a] ")
    s.write("one\ntw")
    s.write("o\rthree\n\n")
    assert sink.getvalue() == "[a] one\n[a] two\r[a] three\n\n"


# ----- Ctrl-C ---------------------------------------------------------------------------------------

def _alive_with(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_ctrl_c_stops_every_worker_and_leaves_nothing(tmp_path):
    doc = {"name": "long", "defaults": {"data": "digits", "seed": 0, "arch": "convnet8", "input-shape": "1,8,8",
                                         "eval-n": 0}, "stages": [
        {"name": f"long-{i}", "command": "finetune", "options": {"epochs": 200}} for i in range(2)]}
    recipe = _write(tmp_path / "long.yaml", doc)
    out = tmp_path / "out-ctrl-c"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "rcomp", "run", str(recipe), "--out-dir", str(out), "--workers",
                             "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_alive_with(str(out))) < 3:
            time.sleep(0.2)
        assert len(_alive_with(str(out))) == 3  # the launcher and its two workers
        time.sleep(3)  # the workers are training
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("rcomp:")] == ["rcomp: interrupted; no output was written"]
    assert "Traceback" not in err
    time.sleep(0.5)
    assert _alive_with(str(out)) == []  # no orphan
    assert not [p for p in out.rglob("*") if p.is_file() and p.parent.name != ".rcomp-run"]  # no model, no temp file
