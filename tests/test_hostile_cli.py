"""Hostile input at the command line, in --config files and in recipes (issue 15): every case ends in
exit 2 with one line, writes nothing, runs no code, and answers within seconds. File-level cases
(checkpoints, headers, races) are in tests/test_hostile.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error

MARKER_MODULE = """
from pathlib import Path
def factory(**kw):
    Path({marker!r}).write_text("ran")
    import torch
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
"""


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module whose factory leaves a marker file when it runs; on sys.path like an installed package."""
    pkg = tmp_path / "evilpkg_rcomp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    marker = tmp_path / "MARKER"
    (pkg / "mod.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def _recipe(tmp_path, stages, **top) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "hostile", **top, "stages": stages}, sort_keys=False))
    return p


def _files(root: Path) -> set:
    return {p for p in root.rglob("*")}


BASE = {"name": "base", "command": "finetune", "options": {"arch": "convnet8", "epochs": 1, "n": 32, "eval-n": 0}}

RECIPES = [
    ("user factory", [{**BASE, "options": {**BASE["options"], "arch": "evilpkg_rcomp.mod:factory"}}],
     "user factory runs code"),
    ("os.system factory", [{**BASE, "options": {**BASE["options"], "arch": "os:system",
                                                "arch-kwargs": {"command": "touch HACKED"}}}], "user factory"),
    ("trust in options", [{**BASE, "options": {**BASE["options"], "trust-factory": True}}],
     "only be given on the command line"),
    ("trust underscore", [{**BASE, "options": {**BASE["options"], "trust_factory": True}}],
     "only be given on the command line"),
    ("force in options", [{**BASE, "options": {**BASE["options"], "force": True}}], "output: key"),
    ("output in options", [{**BASE, "options": {**BASE["options"], "output": "/tmp/x.safetensors"}}], "output: key"),
    ("absolute output", [{**BASE, "output": "/tmp/rcomp-hostile.safetensors"}], "inside the output folder"),
    ("dotdot output", [{**BASE, "output": "../escaped.safetensors"}], "inside the output folder"),
    ("nested dotdot", [{**BASE, "output": "a/../../escaped.safetensors"}], "inside the output folder"),
    ("slash in name", [{**BASE, "name": "a/b"}], "plain name"),
    ("dotdot name", [{**BASE, "name": ".."}], "plain name"),
    ("traversal name", [{**BASE, "name": "../../etc"}], "plain name"),
    ("empty name", [{**BASE, "name": ""}], "plain name"),
    ("newline name", [{**BASE, "name": "a\nb"}], "plain name"),
    ("escape in name", [{**BASE, "name": "a\x1b[31m"}], "plain name"),
    ("same output twice", [BASE, {**BASE, "name": "other", "output": "base.safetensors"}], "also stage"),
    ("unknown command", [{**BASE, "command": "rm"}], "unknown command"),
    ("run as stage", [{**BASE, "command": "run"}], "unknown command"),
    ("epochs zero", [{**BASE, "options": {**BASE["options"], "epochs": 0}}], "--epochs"),
    ("momentum nan", [{**BASE, "options": {**BASE["options"], "momentum": float("nan")}}], "--momentum"),
    ("weight decay inf", [{**BASE, "options": {**BASE["options"], "weight-decay": float("inf")}}], "--weight-decay"),
    ("beta nan", [{**BASE, "options": {**BASE["options"], "beta": "nan"}}], "--beta"),
    ("steps huge", [{**BASE, "options": {**BASE["options"], "adv": "pgd", "steps": 10**9}}], "--steps"),
    ("eps out of range", [{**BASE, "options": {**BASE["options"], "eps": 2}}], "--eps"),
    ("unknown option", [{**BASE, "options": {**BASE["options"], "rm-rf": True}}], "has no option"),
    ("options not a mapping", [{**BASE, "options": ["x"]}], "mapping"),
    ("grid of millions", [{**BASE, "name": "g{a}-{b}-{c}", "grid": {"a": list(range(200)), "b": list(range(200)),
                                                                  "c": list(range(200))}}], "limit"),
    ("cycle", [{**BASE, "input": "other"}, {**BASE, "name": "other", "command": "prune", "input": "base",
                                          "options": {"ratio": 0.5}}], "cycle"),
    ("missing input", [{"name": "p", "command": "prune", "input": "/nonexistent/x.safetensors",
                        "options": {"ratio": 0.5}}], "neither a stage name"),
    ("unknown stage key", [{**BASE, "shell": "rm -rf /"}], "unknown stage key"),
]


@pytest.mark.parametrize("stages,needle", [pytest.param(s, n, id=i) for i, s, n in RECIPES])
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_hostile_recipes_are_refused_before_anything_runs(cli, tmp_path, evil, stages, needle, dry):
    rec = _recipe(tmp_path, stages)
    out = tmp_path / "out"
    before = _files(tmp_path)
    t0 = time.perf_counter()
    res = cli("run", rec, "--out-dir", out, *(["--dry-run"] if dry else []))
    assert time.perf_counter() - t0 < 10
    assert_one_line_error(res, needle)
    assert _files(tmp_path) == before and not evil.exists()
    assert not Path("/tmp/rcomp-hostile.safetensors").exists() and not Path("HACKED").exists()


@pytest.mark.parametrize("sets,needle", [
    (["base.trust-factory=true"], "only be given on the command line"),
    (["base.force=true"], "output: key"),
    (["base.arch=evilpkg_rcomp.mod:factory"], "user factory runs code"),
    (["*.trust_factory=true"], "only be given on the command line"),
])
def test_set_overrides_obey_the_same_rules(cli, tmp_path, evil, sets, needle):
    rec = _recipe(tmp_path, [BASE])
    args = [a for s in sets for a in ("--set", s)]
    assert_one_line_error(cli("run", rec, "--out-dir", tmp_path / "out", *args), needle)
    assert not evil.exists() and not (tmp_path / "out").exists()


def test_allow_factory_lets_the_named_factory_run(cli, tmp_path, evil):
    stage = {**BASE, "options": {**BASE["options"], "arch": "evilpkg_rcomp.mod:factory", "data": "digits"}}
    rec = _recipe(tmp_path, [stage])
    res = cli("run", rec, "--out-dir", tmp_path / "out", "--allow-factory", "evilpkg_rcomp.mod:other")
    assert_one_line_error(res, "user factory runs code")
    assert not evil.exists()
    res = cli("run", rec, "--out-dir", tmp_path / "out", "--allow-factory", "evilpkg_rcomp.mod:factory")
    assert res.code == 0, res.stderr
    assert evil.exists() and (tmp_path / "out" / "base.safetensors").exists()


BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
stages: [*g]
"""

YAML_FILES = [
    ("alias bomb", lambda p: p.write_text(BOMB), "YAML"),
    ("deep nesting", lambda p: p.write_text("stages: " + "[" * 500 + "]" * 500), "deep"),
    ("python tag", lambda p: p.write_text("stages: !!python/object/apply:os.system ['touch HACKED']\n"), "YAML"),
    ("too large", lambda p: p.write_text("# " + "x" * (2 << 20) + "\nstages: []\n"), "over the limit"),
    ("not utf-8", lambda p: p.write_bytes(b"stages: [\xff\xfe]\n"), "UTF-8"),
    ("a list", lambda p: p.write_text("- 1\n- 2\n"), "map"),
    ("a directory", lambda p: p.mkdir(), "directory"),
    ("a fifo", lambda p: os.mkfifo(p), "FIFO"),
    ("missing", lambda p: None, "does not exist"),
    ("symlink loop", lambda p: os.symlink(p, p), "loop"),
]


@pytest.mark.parametrize("make,needle", [pytest.param(m, n, id=i) for i, m, n in YAML_FILES])
@pytest.mark.parametrize("where", ["recipe", "config"])
def test_hostile_yaml_files_are_refused_fast(cli, tmp_path, tiny_ckpt, make, needle, where):
    p = tmp_path / "f.yaml"
    make(p)
    t0 = time.perf_counter()
    if where == "recipe":
        res = cli("run", p, "--out-dir", tmp_path / "out", "--dry-run")
    else:
        res = cli("prune", tiny_ckpt, "--ratio", "0.5", "--config", p, "-o", tmp_path / "o.safetensors")
    assert time.perf_counter() - t0 < 5
    assert_one_line_error(res, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.safetensors").exists()
    assert not Path("HACKED").exists()


BAD_FLAGS = [
    (["prune", "{ckpt}", "--ratio", "50"], "--ratio"),
    (["prune", "{ckpt}", "--ratio", "0.5", "--iterative", "100000000"], "--iterative"),
    (["prune", "{ckpt}", "--ratio", "nan"], "--ratio"),
    (["prune", "{ckpt}", "--ratio", "0.5", "--round-to", "0"], "--round-to"),
    (["attack", "{ckpt}", "--data", "digits", "--attack", "pgd", "--eps", "2"], "--eps"),
    (["attack", "{ckpt}", "--data", "digits", "--attack", "pgd", "--eps", "0.1", "--steps", "1000000000"], "--steps"),
    (["attack", "{ckpt}", "--data", "digits", "--attack", "pgd", "--eps", "0.1", "--restarts", "0"], "--restarts"),
    (["attack", "{ckpt}", "--data", "digits", "--attack", "pgd", "--eps", "0.1", "--alpha", "0"], "--alpha"),
    (["attack", "{ckpt}", "--data", "digits", "--attack", "pgd", "--eps", "0.1", "-n", "0"], "-n"),
    (["attack", "{ckpt}", "--data", "digits", "--attack", "pgd", "--eps", "1/0"], "divides by zero"),
    (["finetune", "{ckpt}", "--momentum", "nan"], "--momentum"),
    (["finetune", "{ckpt}", "--weight-decay", "inf"], "--weight-decay"),
    (["finetune", "{ckpt}", "--beta", "nan"], "--beta"),
    (["finetune", "{ckpt}", "--lr", "-1"], "--lr"),
    (["finetune", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["finetune", "{ckpt}", "--epochs", "99999999999"], "--epochs"),
    (["finetune", "{ckpt}", "--val-split", "1"], "--val-split"),
    (["quantize", "{ckpt}", "--bits", "4"], "--simulate"),
    (["quantize", "{ckpt}", "--calib-n", "-5"], "--calib-n"),
    (["bench", "{ckpt}", "--data", "digits", "--latency-batch", "-1"], "--latency-batch"),
]


@pytest.mark.parametrize("args,needle", BAD_FLAGS)
def test_bad_flag_values_are_one_line(cli, tiny_ckpt, tmp_path, args, needle):
    before = _files(tmp_path)
    res = cli(*[a.format(ckpt=tiny_ckpt) for a in args])
    assert_one_line_error(res, needle)
    assert _files(tmp_path) == before


def _rcomp(args, stdin, timeout=30):
    return subprocess.run([sys.executable, "-m", "rcomp", *args], stdin=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_endless_stdin_is_refused_fast(tmp_path):
    with open("/dev/zero", "rb") as zero:
        t0 = time.perf_counter()
        res = _rcomp(["prune", "--ratio", "0.5", "-o", str(tmp_path / "o.safetensors")], zero)
    assert time.perf_counter() - t0 < 20
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "stdin" in res.stderr, res.stderr


def test_binary_stdin_is_refused(tmp_path):
    p = tmp_path / "bin"
    p.write_bytes(b"\x00\x01\x02" * 10)
    with open(p, "rb") as fh:
        res = _rcomp(["prune", "--ratio", "0.5"], fh)
    assert res.returncode == 2 and "stdin" in res.stderr and "Traceback" not in res.stderr


def test_terminal_escapes_in_metadata_never_reach_the_terminal(cli, tmp_path):
    import rcomp

    from conftest import make_checkpoint

    p = make_checkpoint(tmp_path / "m.safetensors")
    m = rcomp.load(p)
    m.meta.class_names = [f"\x1b]0;pwned\x07class{i}\x1b[2J" for i in range(10)]
    m.meta.dataset = "digits\r\x1b[31mred"
    bad = tmp_path / "bad.safetensors"
    rcomp.save(m, bad)
    res = cli("info", bad)
    assert res.code == 0, res.stderr
    assert "\x1b" not in res.stdout and "\r" not in res.stdout and "\x07" not in res.stdout
    assert "\\x1b" in res.stdout


def test_dry_run_quotes_commands_as_a_shell_would(cli, tmp_path, tiny_ckpt):
    weird = tmp_path / "my model; rm -rf x.safetensors"
    weird.write_bytes(tiny_ckpt.read_bytes())
    rec = _recipe(tmp_path, [{"name": "p", "command": "prune", "input": str(weird), "options": {"ratio": 0.5}}])
    res = cli("run", rec, "--out-dir", tmp_path / "out", "--dry-run")
    assert res.code == 0, res.stderr
    assert f"'{weird}'" in res.stdout
