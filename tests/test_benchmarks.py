"""The benchmark scripts still fit the library they measure (no test runs them: they take minutes to hours).

Four of them broke silently when the datasets became a catalogue (a name they imported went away). Cheap
checks that would have caught it: every name a script imports from rcomp exists (including code a script
runs in a child process from a string), and every script answers ``--help`` without running anything and
refuses an unknown flag.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


def _trees(path: Path):
    """The script's syntax tree, plus that of every string constant in it that parses as code importing rcomp."""
    tree = ast.parse(path.read_text(), str(path))
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value \
                and "rcomp" in node.value:
            try:
                yield ast.parse(node.value)
            except SyntaxError:
                continue


def rcomp_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every ``from rcomp... import name`` and ``import rcomp...`` in the script."""
    out = []
    for tree in _trees(path):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rcomp":
                out += [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "rcomp"]
    return out


def missing(imports: list[tuple[str, str | None]]) -> list[str]:
    bad = []
    for module, name in imports:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            bad.append(f"{module} ({exc})")
            continue
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                bad.append(f"{module}.{name}")
    return bad


def test_there_are_benchmarks_and_they_import_rcomp():
    assert len(SCRIPTS) >= 10
    assert sum(bool(rcomp_imports(p)) for p in SCRIPTS) >= 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_name_a_benchmark_imports_from_rcomp_exists(script):
    assert missing(rcomp_imports(script)) == []


def test_the_import_check_can_fail(tmp_path):
    fake = tmp_path / "bench_fake.py"
    fake.write_text('CHILD = """\nfrom rcomp.data.registry import NO_SUCH_TABLE\n"""\n'
                    "def run():\n    from rcomp.models.loading import load, no_such_function\n")
    assert sorted(missing(rcomp_imports(fake))) == ["rcomp.data.registry.NO_SUCH_TABLE",
                                                   "rcomp.models.loading.no_such_function"]


HELP_ALL = r"""
import runpy, sys
bad = []
for path in sys.argv[1:]:
    for argv, want in (([path, "--help"], 0), ([path, "--no-such-flag"], 2)):
        sys.argv = argv
        try:
            runpy.run_path(path, run_name="__main__")
            bad.append(f"{path} {argv[1]}: ran to the end")
        except SystemExit as exc:
            if exc.code != want:
                bad.append(f"{path} {argv[1]}: exit {exc.code}, want {want}")
print("BAD", bad)
"""


def test_every_benchmark_answers_help_and_refuses_unknown_flags():
    """In one process (torch imported once): ``--help`` exits 0 and ``--no-such-flag`` exits 2, neither runs
    the benchmark (a run would take minutes, and 'ran to the end' is reported)."""
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, *map(str, SCRIPTS)], capture_output=True, text=True,
                          cwd=BENCH, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "BAD []", proc.stdout[-3000:]
    assert proc.stdout.count("usage:") == len(SCRIPTS)
