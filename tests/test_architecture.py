"""The layer rules of docs/architecture.md, enforced over every import in the package (function-level
imports included), and the stage table's promises: every option declared once, consistent with the
library it feeds."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "rcomp"
DOC = ROOT / "docs" / "architecture.md"


def _layers() -> dict[str, int]:
    """``top-level part of rcomp -> layer`` from the table in docs/architecture.md (one row per layer)."""
    layers: dict[str, int] = {}
    rows = [ln for ln in DOC.read_text().splitlines() if re.match(r"^\| \d+ \|", ln)]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`([A-Za-z_]+)`", cells[1]):
            layers[name] = int(cells[0])
    return layers


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rcomp"


def _imports():
    """(importing module, imported rcomp module, line) for every import statement in the package."""
    for f in sorted(PKG.rglob("*.py")):
        mod = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for n in names:
                if n == "rcomp" or n.startswith("rcomp."):
                    yield mod, n, node.lineno


def test_every_part_of_the_package_has_a_layer():
    layers = _layers()
    parts = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    parts = {("rcomp" if p == "__init__" else p) for p in parts}
    assert parts - set(layers) == set(), f"add these to the layer table in {DOC.name}"


def test_imports_follow_the_layers():
    layers = _layers()
    bad = []
    for mod, target, line in _imports():
        a, b = _part(mod), _part(target)
        if a != b and layers[b] > layers[a]:
            bad.append(f"{mod}:{line} imports {target} (layer {layers[a]} -> {layers[b]})")
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_the_cli():
    bad = [f"{m}:{ln}" for m, t, ln in _imports() if _part(t) == "cli" and _part(m) not in ("cli", "__main__")]
    assert not bad, bad


def test_io_is_the_file_format_only():
    bad = [f"{m}:{ln} -> {t}" for m, t, ln in _imports() if _part(m) == "io" and _part(t) in ("models", "quant")]
    assert not bad, bad


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The check itself can fail: an io module importing the stages breaks the rule."""
    layers = _layers()
    assert layers["io"] < layers["stages"] and layers["stages"] < layers["cli"]


# ----- the stage table ---------------------------------------------------------------------

def _stages():
    from rcomp.stages import stage_table

    return stage_table()


def test_choices_declared_match_the_library():
    """Choices are declared in the stage configs (so they are checked before torch loads); they must
    be exactly what the library accepts."""
    from rcomp.attacks import ATTACKS, SUITES
    from rcomp.pruning.pruner import DATA_METHODS, METHODS, SCOPES
    from rcomp.quant.backend import BACKENDS
    from rcomp.stages import attack, finetune, prune, quantize
    from rcomp.train.adversarial import MODES
    from rcomp.train.optim import OPTIMIZERS, SCHEDULES

    assert set(attack.ATTACK_NAMES) == set(ATTACKS) | set(SUITES)
    assert set(prune.METHODS) == set(METHODS) and set(prune.SCOPES) == set(SCOPES)
    assert set(prune.NEEDS_DATA) == set(DATA_METHODS)
    assert set(quantize.BACKENDS) == set(BACKENDS) | {"onnxruntime"}  # ONNX Runtime: rcomp.stages.export
    assert set(finetune.ADV_MODES) == set(MODES)
    assert set(finetune.OPTIMIZERS) == set(OPTIMIZERS) and set(finetune.SCHEDULES) == set(SCHEDULES)


def test_every_option_is_declared_once_with_help():
    from rcomp.options import options_of

    for name, st in _stages().items():
        flags = [f for o in options_of(st.config) for f in o.flags]
        assert len(flags) == len(set(flags)), (name, flags)
        for o in options_of(st.config):
            assert o.help, (name, o.name)
        names = {f.name for f in dataclasses.fields(st.config)}
        assert names == {o.name for o in options_of(st.config)}, name


@pytest.mark.parametrize("stage", ["convert", "prune", "quantize", "finetune", "attack", "bench", "export"])
def test_defaults_build_a_config_or_say_what_is_missing(stage):
    """Every stage config builds from its defaults, or refuses with one RcompError naming an option."""
    from rcomp.errors import RcompError
    from rcomp.options import make_config

    cls = _stages()[stage].config
    try:
        make_config(cls, {}, command=stage)
    except RcompError as exc:
        assert "--" in str(exc)
