"""Hostile input at the command line, in --config files and in recipes (issue 15): every case ends in
exit 2 with one line, writes nothing, runs no code, and answers within seconds. File-level cases
(checkpoints, headers, races) are in tests/test_hostile.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error, cpu_seconds

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
    if stages == "dup":  # a key given twice, which yaml.safe_dump cannot write
        p.write_text("name: hostile\nstages:\n  - name: base\n    command: finetune\n"
                     "    options: {arch: convnet8, epochs: 1, epochs: 2}\n")
        return p
    p.write_text(yaml.safe_dump({"name": "hostile", **top, "stages": stages}, sort_keys=False, width=1 << 30))
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
    ("dotdot name from a grid", [{**BASE, "name": "p{r}", "grid": {"r": ["/../../x"]}}], "plain name"),
    ("dotdot inside a name", [{**BASE, "name": "a..b"}], "plain name"),
    ("duplicate option key", "dup", "given twice"),
    ("900 kB option value", [{**BASE, "options": {**BASE["options"], "lr": "9" * 900_000}}], "--lr"),
]


@pytest.mark.parametrize("stages,needle", [pytest.param(s, n, id=i) for i, s, n in RECIPES])
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_hostile_recipes_are_refused_before_anything_runs(cli, tmp_path, evil, stages, needle, dry):
    rec = _recipe(tmp_path, stages)
    out = tmp_path / "out"
    before = _files(tmp_path)
    t0 = cpu_seconds()
    res = cli("run", rec, "--out-dir", out, *(["--dry-run"] if dry else []))
    assert cpu_seconds() - t0 < 10
    assert_one_line_error(res, needle)
    assert len(res.stderr) < 400  # values are echoed cut to 80 characters, not whole (a 900 kB value)
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
    t0 = cpu_seconds()
    if where == "recipe":
        res = cli("run", p, "--out-dir", tmp_path / "out", "--dry-run")
    else:
        res = cli("prune", tiny_ckpt, "--ratio", "0.5", "--config", p, "-o", tmp_path / "o.safetensors")
    assert cpu_seconds() - t0 < 5
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
    res = cli(*[a.replace("{ckpt}", str(tiny_ckpt)) for a in args])
    assert_one_line_error(res, needle)
    assert _files(tmp_path) == before


def _rcomp(args, stdin, timeout=30):
    return subprocess.run([sys.executable, "-m", "rcomp", *args], stdin=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_endless_stdin_is_refused_fast(tmp_path):
    with open("/dev/zero", "rb") as zero:
        t0 = cpu_seconds()
        res = _rcomp(["prune", "--ratio", "0.5", "-o", str(tmp_path / "o.safetensors")], zero)
    assert cpu_seconds() - t0 < 20
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



# ------------------------------------------------------------------------------------------------
# issue 22: recipes writing outside --out-dir or over their own inputs, stamps, output folders
# ------------------------------------------------------------------------------------------------

PRUNE = {"name": "p", "command": "prune", "options": {"ratio": 0.5}}


@pytest.mark.parametrize("top,needle", [
    ({"out_dir": "/tmp/rcomp-hostile-out"}, "relative folder"),
    ({"out_dir": "../escaped"}, "relative folder"),
    ({"name": "/tmp/rcomp-hostile-name"}, "relative folder"),
    ({"name": "../escaped"}, "relative folder"),
    ({"vars": [1, 2]}, "vars must be a mapping"),
    ({"vars": 5}, "vars must be a mapping"),
    ({"defaults": ["data"]}, "defaults must be a mapping"),
], ids=["abs-out_dir", "dotdot-out_dir", "abs-name", "dotdot-name", "vars-list", "vars-int", "defaults-list"])
def test_recipe_top_level_escapes_are_refused(cli, tmp_path, tiny_ckpt, monkeypatch, top, needle):
    monkeypatch.chdir(tmp_path)
    rec = _recipe(tmp_path, [{**PRUNE, "input": str(tiny_ckpt)}], **top)
    before = _files(tmp_path)
    assert_one_line_error(cli("run", rec), needle)  # no --out-dir: the recipe's out_dir or name decides
    assert _files(tmp_path) == before
    assert not Path("/tmp/rcomp-hostile-out").exists() and not Path("/tmp/rcomp-hostile-name").exists()


def _inputs_case(tmp_path, tiny_ckpt, which):
    """(recipe, out dir) where a stage output would overwrite the recipe or another stage's input file."""
    src = tmp_path / "in.safetensors"
    src.write_bytes(tiny_ckpt.read_bytes())
    if which == "recipe":
        return _recipe(tmp_path, [{**PRUNE, "input": str(src), "output": "r.yaml"}]), tmp_path
    if which == "input":
        return _recipe(tmp_path, [{**PRUNE, "input": str(src)},
                                  {**PRUNE, "name": "q", "input": str(tiny_ckpt), "output": "in.safetensors"}]), tmp_path
    out = tmp_path / "out"  # a hard link of the input inside the output folder
    out.mkdir()
    os.link(src, out / "q.safetensors")
    return _recipe(tmp_path, [{**PRUNE, "input": str(src)}, {**PRUNE, "name": "q", "input": str(tiny_ckpt)}]), out


@pytest.mark.parametrize("which,needle", [("recipe", "is the recipe file"), ("input", "is an input of stage"),
                                          ("hardlinked-input", "is an input of stage")])
def test_recipe_outputs_never_overwrite_its_inputs(cli, tmp_path, tiny_ckpt, which, needle):
    rec, out = _inputs_case(tmp_path, tiny_ckpt, which)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for dry in ([], ["--dry-run"]):
        assert_one_line_error(cli("run", rec, "--out-dir", out, *dry), needle)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_two_outputs_that_are_one_file_through_a_hard_link_are_refused(cli, tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.safetensors").write_bytes(b"old")
    os.link(out / "a.safetensors", out / "b.safetensors")
    rec = _recipe(tmp_path, [{**PRUNE, "name": "a", "input": str(tiny_ckpt)},
                             {**PRUNE, "name": "b", "input": str(tiny_ckpt), "options": {"ratio": 0.3}}])
    assert_one_line_error(cli("run", rec, "--out-dir", out), "same file as stage 'a'")
    assert (out / "a.safetensors").read_bytes() == b"old" and (out / "a.safetensors").stat().st_nlink == 2


def _plant(kind):
    def make(stamps: Path, elsewhere: Path) -> None:
        if kind == "dir-symlink":
            stamps.symlink_to(elsewhere, target_is_directory=True)
            return
        stamps.mkdir()
        if kind == "file-symlink":
            (stamps / "p.json").symlink_to(elsewhere / "victim.json")
        elif kind == "fifo":
            os.mkfifo(stamps / "p.json")
        elif kind == "folder":
            (stamps / "p.json").mkdir()
    return make


@pytest.mark.parametrize("kind,needle", [("dir-symlink", "is not a folder"), ("file-symlink", "not a regular file"),
                                         ("fifo", "not a regular file"), ("folder", "not a regular file")])
def test_planted_stamps_are_refused_fast(cli, tmp_path, tiny_ckpt, kind, needle):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    _plant(kind)(out / ".rcomp-run", elsewhere)
    rec = _recipe(tmp_path, [{**PRUNE, "input": str(tiny_ckpt)}])
    t0 = cpu_seconds()
    assert_one_line_error(cli("run", rec, "--out-dir", out), needle)  # a FIFO stamp used to hang here
    assert cpu_seconds() - t0 < 10
    assert list(elsewhere.iterdir()) == [] and not (out / "p.safetensors").exists()


def test_an_output_damaged_after_its_run_is_made_again(cli, tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    rec = _recipe(tmp_path, [{**PRUNE, "input": str(tiny_ckpt)}])
    assert cli("run", rec, "--out-dir", out).code == 0
    made = (out / "p.safetensors").read_bytes()
    res = cli("run", rec, "--out-dir", out)
    assert res.code == 0 and "up to date, skipped" in res.stderr
    damaged = bytearray(made)
    damaged[-4:] = b"XXXX"
    (out / "p.safetensors").write_bytes(bytes(damaged))
    res = cli("run", rec, "--out-dir", out)
    assert res.code == 0, res.stderr
    assert "sha256 differs" in res.stderr and "skipped" not in res.stderr
    assert (out / "p.safetensors").read_bytes() == made


@pytest.mark.parametrize("where,needle", [("file", "is not a folder"), ("below-file", "lies below"),
                                          ("read-only", "cannot create files")])
def test_unusable_out_dirs_are_one_line(cli, tmp_path, tiny_ckpt, monkeypatch, where, needle):
    (tmp_path / "afile").write_text("x")
    target = {"file": tmp_path / "afile", "below-file": tmp_path / "afile" / "sub",
              "read-only": tmp_path / "ro" / "out"}[where]
    if where == "read-only":  # root ignores permission bits: the folder refuses new files as a read-only mount does
        import tempfile

        (tmp_path / "ro").mkdir()
        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **kw):
            if dir is not None and Path(dir).resolve() == (tmp_path / "ro").resolve():
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **kw)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    rec = _recipe(tmp_path, [{**PRUNE, "input": str(tiny_ckpt)}])
    before = _files(tmp_path)
    assert_one_line_error(cli("run", rec, "--out-dir", target), needle)
    assert _files(tmp_path) == before


def test_a_stage_that_fails_leaves_no_output_folder(cli, tmp_path, tiny_ckpt, monkeypatch):
    from rcomp.errors import RcompError
    from rcomp.recipes import engine

    def fails(st, log):  # a stage that fails at run time, after every plan-time check passed
        raise RcompError(f"stage {st.name} (line {st.line}) failed: boom")
    monkeypatch.setattr(engine, "_run_stage", fails)
    rec = _recipe(tmp_path, [{**PRUNE, "input": str(tiny_ckpt)}])
    res = cli("run", rec, "--out-dir", tmp_path / "out")
    assert res.code == 2 and "stage p (line 3) failed" in res.stderr.splitlines()[-1], res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["config", "recipe"])
def test_duplicate_yaml_keys_are_refused_with_the_key_and_lines(cli, tmp_path, tiny_ckpt, where):
    if where == "config":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("ratio: 0.5\nratio: 0.3\n")
        res = cli("prune", tiny_ckpt, "--config", cfg, "-o", tmp_path / "o.safetensors")
        assert_one_line_error(res, "'ratio' is given twice", "lines 1 and 2")
    else:
        res = cli("run", _recipe(tmp_path, "dup"), "--out-dir", tmp_path / "out")
        assert_one_line_error(res, "'epochs' is given twice", "lines 5 and 5")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "out").exists()


def test_merge_keys_may_still_be_overridden(tmp_path):
    from rcomp.safeyaml import load_yaml_text

    assert load_yaml_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")["b"] == {"x": 3, "y": 2}


# ------------------------------------------------------------------------------------------------
# issue 22: option values, environment, paths
# ------------------------------------------------------------------------------------------------

BAD_FLAGS += [
    (["finetune", "--arch", "convnet8", "--input-shape", "1,65536,8", "--data", "digits"], "over the limits"),
    (["finetune", "--arch", "convnet8", "--input-shape", "3,65536,65536", "--data", "fake"], "over the limits"),
    (["finetune", "--arch", "mlp", "--arch-kwargs", '{"hidden": [100000000, 100000000]}', "--data", "digits"],
     "over the limit"),
    (["finetune", "--arch", "resnet18-cifar", "--arch-kwargs", '{"width": 100000}', "--data", "digits"],
     "over the limit"),
    (["finetune", "--arch", "mlp", "--arch-kwargs", '{"hidden": [-5]}', "--data", "digits"], "cannot be built"),
    (["finetune", "--arch", "convnet8", "--arch-kwargs", '{"width": 1e29}', "--data", "digits"],
     "'width' follows from the data"),
    (["finetune", "--arch", "convnet8", "--arch-kwargs", '{"hidden": 1e29}', "--data", "digits"],
     "bad arguments for architecture convnet8: {'hidden': 1e+29} holds a value of the wrong type"),
    (["finetune", "--arch", "convnet8", "--arch-kwargs", '{"colour": 3}', "--data", "digits"],
     "takes no option 'colour'"),
    (["prune", "{ckpt}", "--ratio", "9" * 100_000], "not a number"),
    (["prune", "{ckpt}", "--ratio", "0.5", "-o", "/dev/stdout"], "prints that file's path on stdout"),
    (["prune", "{ckpt}", "--ratio", "0.5", "-o", "/dev/stdout", "--force"], "prints that file's path on stdout"),
    (["prune", "{ckpt}", "--ratio", "0.5", "-o", "a" * 300 + ".safetensors"], "file name too long"),
    (["prune", "a" * 300 + ".safetensors", "--ratio", "0.5"], "file name too long"),
    (["finetune", "{ckpt}", "--data", "digits", "--seed", "1" * 5000], "--seed"),
]


def test_echoed_values_are_cut_and_parsing_is_linear(cli, tiny_ckpt):
    t0 = cpu_seconds()
    res = cli("prune", tiny_ckpt, "--ratio", "1" * 200_000 + "/")  # quadratic in a backtracking regex
    assert cpu_seconds() - t0 < 2
    assert_one_line_error(res, "--ratio")
    assert len(res.stderr) < 250 and "..." in res.stderr


@pytest.mark.parametrize("value", ["99999999999999999999", "\u00b2", "-5", "1.5", " 12x"])
def test_a_malformed_source_date_epoch_is_refused_before_any_work(cli, tiny_ckpt, tmp_path, monkeypatch, value):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    res = cli("prune", tiny_ckpt, "--ratio", "0.5", "-o", tmp_path / "o.safetensors")
    assert_one_line_error(res, "SOURCE_DATE_EPOCH")
    assert "pruned" not in res.stderr and not (tmp_path / "o.safetensors").exists()
    from rcomp.errors import RcompError
    from rcomp.io.format import utc_now

    with pytest.raises(RcompError, match="SOURCE_DATE_EPOCH"):
        utc_now()


def test_a_deleted_working_directory_is_one_line(tmp_path, tiny_ckpt):
    gone = tmp_path / "gone"
    gone.mkdir()
    cmd = f"cd {gone} && rmdir {gone} && exec {sys.executable} -m rcomp prune {tiny_ckpt} --ratio 0.5 -o x.safetensors"
    res = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rcomp")]
    assert res.returncode == 2 and len(lines) == 1 and "current directory no longer exists" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and "FATAL" not in res.stderr


def test_stdout_on_a_full_device_is_one_line(tiny_ckpt):
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "rcomp", "info", str(tiny_ckpt)], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "standard output cannot be written" in res.stderr, res.stderr


@pytest.mark.parametrize("command", [["info", "{ckpt}"], ["info", "{ckpt}", "--json"],
                                     ["prune", "{ckpt}", "--ratio", "0.5", "-o", "{tmp}/p.safetensors"]])
def test_a_closed_stdout_exits_141_quietly(tiny_ckpt, tmp_path, command):
    """The reader left (``rcomp info X | head -c0``): exit 141 (128 + SIGPIPE, as a command killed by it),
    nothing on stderr; a written output stays written."""
    args = [a.format(ckpt=tiny_ckpt, tmp=tmp_path) for a in command]
    proc = subprocess.Popen([sys.executable, "-m", "rcomp", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(300) == 141, err
    assert err.count("rcomp: error") == 0 and "Traceback" not in err and "Exception ignored" not in err, err


# ------------------------------------------------------------------------------------------------
# issue 22: signals (SIGTERM is 143 with its line in every command, not typer's silent 130)
# ------------------------------------------------------------------------------------------------

def _terminate(*_a, **_k):
    from rcomp.signals import Terminated

    raise Terminated()


@pytest.mark.parametrize("command,target", [
    (["prune", "{ckpt}", "--ratio", "0.5", "-o", "{tmp}/o.safetensors"], "rcomp.stages.prune.apply"),
    (["quantize", "{ckpt}", "--data", "digits", "--simulate", "--bits", "4", "--calib-n", "8", "-o",
      "{tmp}/o.safetensors"],
     "rcomp.stages.quantize.apply"),
    (["finetune", "{ckpt}", "--data", "digits", "-n", "32", "--eval-n", "0", "-o", "{tmp}/o.safetensors"],
     "rcomp.train.loop.finetune"),
    (["bench", "{ckpt}", "--data", "digits", "-n", "8", "--attack", "fgsm", "--eps", "0.1", "-o", "{tmp}/o.json"],
     "rcomp.evaluation.bench.bench"),
    (["run", "{recipe}", "--out-dir", "{tmp}/out"], "rcomp.recipes.engine._run_stage"),
    (["attack", "{ckpt}", "--data", "digits", "-n", "8", "--attack", "fgsm", "--eps", "0.1"],
     "rcomp.evaluation.robustness.evaluate"),
])
def test_sigterm_during_work_exits_143_with_its_line(cli, tiny_ckpt, tmp_path, monkeypatch, command, target):
    import importlib

    mod, _, fn = target.rpartition(".")
    module = importlib.import_module(mod)
    if not hasattr(module, fn):
        pytest.skip(f"{target} moved")
    monkeypatch.setattr(module, fn, _terminate)
    rec = _recipe(tmp_path, [{**PRUNE, "input": str(tiny_ckpt)}])
    res = cli(*[a.format(ckpt=tiny_ckpt, tmp=tmp_path, recipe=rec) for a in command])
    assert res.code == 143, (res.code, res.stderr)
    assert res.stderr.strip().splitlines()[-1] == "rcomp: terminated; no output was written"
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.rglob("*.rcomp-tmp"))


def test_a_real_sigterm_during_finetune_exits_143(tiny_ckpt, tmp_path):
    import signal

    out = tmp_path / "o.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "rcomp", "finetune", str(tiny_ckpt), "--data", "digits",
                             "--epochs", "1000", "--eval-n", "0", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in iter(proc.stderr.readline, ""):  # wait until training runs (torch imported, data loaded)
        if line.startswith("training "):
            break
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(300)
    rest = proc.stderr.read()
    assert rc == 143, rest
    assert rest.strip().splitlines()[-1] == "rcomp: terminated; no output was written"
    assert not out.exists() and not list(tmp_path.glob("*.rcomp-tmp"))



# ------------------------------------------------------------------------------------------------
# issue 22: forged histories, resume states and example files; divergence
# ------------------------------------------------------------------------------------------------

def _refused(res, needle: str, code: int = 2) -> None:
    """Refused with one error line (after any progress lines), no traceback, nothing on stdout."""
    assert res.code == code and res.stdout == "" and "Traceback" not in res.stderr, (res.code, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("rcomp: error:")]
    assert len(errors) == 1 and needle.lower() in errors[0].lower(), res.stderr


def _with_history(src: Path, dst: Path, history) -> Path:
    import json
    import struct

    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["rcomp.history"] = json.dumps(history)
    raw = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return dst


@pytest.mark.parametrize("entry,needle", [
    ({"command": "finetune", "params": [1, 2]}, "params is list"),
    ({"command": "finetune", "params": {}, "metrics": "abc"}, "metrics is str"),
    ({"command": "finetune", "params": {}, "metrics": {"steps": 1e308}}, "whole number"),
    ({"command": "finetune", "params": {}, "metrics": {"steps": float("inf")}}, "whole number"),
    ({"command": "finetune", "params": {"epochs": 10**400}}, "whole number"),
    ({"command": "finetune", "params": {}, "metrics": {"steps": "12"}}, "whole number"),
    ({"command": "finetune", "params": {"adv": ["pgd"]}, "metrics": {"steps": 5}}, "not a name"),
    ({"command": "finetune", "params": {}, "metrics": {"steps": 10**12}}, "over the 1,000,000,000"),
], ids=["params-list", "metrics-str", "steps-1e308", "steps-inf", "epochs-huge", "steps-text", "adv-list", "steps-huge"])
def test_budget_of_a_forged_history_is_one_line(cli, tiny_ckpt, tmp_path, entry, needle):
    ref = _with_history(tiny_ckpt, tmp_path / "ref.safetensors", [entry])
    res = cli("finetune", tiny_ckpt, "--data", "digits", "--budget-of", ref, "--budget-fraction", "0.5",
              "-o", tmp_path / "o.safetensors")
    _refused(res, needle)
    assert not (tmp_path / "o.safetensors").exists()
    import rcomp
    from rcomp.errors import RcompError

    with pytest.raises(RcompError):  # the Python API raises RcompError too, never OverflowError/TypeError
        rcomp.finetune(tiny_ckpt, data="digits", budget_of=ref, budget_fraction=0.5)


@pytest.fixture(scope="module")
def resume_state(tmp_path_factory):
    from conftest import run_cli

    d = tmp_path_factory.mktemp("state")
    res = run_cli(*RESUME_ARGS, "--epochs", "1", "-o", d / "full.safetensors")
    assert res.code == 0, res.stderr
    return d / "full.state.safetensors"


RESUME_ARGS = ["finetune", "--arch", "convnet8", "--data", "digits", "-n", "64", "--eval-n", "0", "--batch-size",
               "32", "--save-every", "1", "--optimizer", "adam"]


def _group(key, value):
    return lambda d, t: d["param_groups"][0].__setitem__(key, value)


def _tensor(key, fn):
    return lambda d, t: t.__setitem__(key, fn(t))


@pytest.mark.parametrize("forge,needle", [
    (_group("lr", "0.1"), "setting lr is '0.1'"),
    (_group("lr", [1]), "setting lr"),
    (_group("lr", 1e300), "setting lr"),
    (_group("betas", "ab"), "setting betas"),
    (_group("params", [0, 1]), "setting params"),
    (_group("momentum", 0.9), "have keys"),
    (lambda d, t: d.__setitem__("param_groups", {"a": 1}), "malformed"),
    (lambda d, t: d.__setitem__("optim_none", [["x", 1]]), "malformed"),
    (_tensor("optim.x", lambda t: __import__("torch").zeros(1)), "malformed optimizer tensor name"),
    (_tensor("optim.0", lambda t: __import__("torch").zeros(1)), "malformed optimizer tensor name"),
    (_tensor("optim.0.exp_avg", lambda t: t["optim.0.exp_avg"].fill_(float("nan"))), "NaN"),
    (_tensor("optim.0.exp_avg", lambda t: t["optim.0.exp_avg"].int()), "not floats"),
], ids=["lr-text", "lr-list", "lr-huge", "betas-text", "params", "sgd-keys", "groups-dict", "none-entries",
        "name-x", "name-short", "nan-buffer", "int-buffer"])
def test_forged_resume_states_are_refused(cli, resume_state, tmp_path, forge, needle):
    """A state whose digest was recomputed after editing (the digest catches damage, not intent)."""
    import json

    from safetensors.torch import load, save

    from rcomp.io.header import read_header
    from rcomp.train.state import KEY, state_digest

    doc = json.loads(read_header(resume_state).metadata[KEY])
    tensors = load(resume_state.read_bytes())
    forge(doc, tensors)
    doc["digest"] = state_digest(tensors, doc)
    forged = tmp_path / "forged.state.safetensors"
    forged.write_bytes(save(tensors, metadata={KEY: json.dumps(doc)}))
    res = cli(*RESUME_ARGS, "--epochs", "2", "--resume", forged, "-o", tmp_path / "o.safetensors")
    _refused(res, needle)
    assert not (tmp_path / "o.safetensors").exists()


def test_an_unforged_state_still_resumes(cli, resume_state, tmp_path):
    res = cli(*RESUME_ARGS, "--epochs", "2", "--resume", resume_state, "-o", tmp_path / "o.safetensors")
    assert res.code == 0, res.stderr


@pytest.mark.parametrize("extra", [[], ["--allow-collapse"]], ids=["plain", "allow-collapse"])
@pytest.mark.parametrize("start", ["trained", "arch"])
def test_a_diverging_run_exits_1_and_writes_nothing(cli, trained_digits, tmp_path, extra, start):
    src = [trained_digits] if start == "trained" else ["--arch", "convnet8"]
    out = tmp_path / "o.safetensors"
    res = cli("finetune", *src, "--data", "digits", "--lr", "10", "--optimizer", "adam", "--epochs", "1",
              "--eval-n", "0", *extra, "-o", out)
    assert res.code == 1, res.stderr
    assert "training diverged in epoch 1" in res.stderr.splitlines()[-1]
    assert not out.exists() and not list(tmp_path.glob("*.rcomp-tmp"))


@pytest.mark.parametrize("labels,needle", [
    (lambda y: y.float().index_fill_(0, __import__("torch").tensor([0]), float("nan")), "whole class indices"),
    (lambda y: y.float(), "whole class indices"),
    (lambda y: y - 100, "whole class indices"),
], ids=["nan", "float", "negative"])
def test_examples_with_bad_labels_are_refused(cli, tiny_ckpt, tmp_path, labels, needle):
    import torch

    from rcomp.io.examples import save_examples

    x = torch.rand(4, 1, 8, 8)
    src = tmp_path / "adv.safetensors"
    save_examples(src, x, x.clone(), labels(torch.tensor([1, 2, 3, 4])), {"attack": "fgsm", "eps": 0.1}, (), False)
    _refused(cli("attack", tiny_ckpt, "--from", src), needle)


@pytest.mark.parametrize("cmd", [("prune", "--ratio", "0.5"), ("attack", "--data", "digits", "-n", "4",
                                                               "--attack", "fgsm", "--eps", "0.1")])
def test_output_names_with_control_characters_are_refused(cli, tiny_ckpt, tmp_path, cmd):
    """`-o $'a\\nb.safetensors'` used to be written and its path printed on two lines: the next command in a pipe
    read `b.safetensors`, another file (the wrong model, silently, where one of that name exists)."""
    for name in ("a\nb.safetensors", "a\tb.safetensors", "a\rb.safetensors"):
        out = tmp_path / name
        res = cli(cmd[0], tiny_ckpt, *cmd[1:], "-o", out)
        assert_one_line_error(res, "control character", "choose a name without one")
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]
