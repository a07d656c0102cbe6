"""The layer rules of docs/architecture.md, enforced over every import in the package (function-level
imports included), and the stage table's promises: every option declared once, every catalogue name
listed once (in its family's catalogue), every catalogue entry backed by code."""

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


def _catalogues():
    """(catalogue module, names) of every family's catalogue, and the closed lists of choices."""
    from rcomp.attacks import catalog as attacks
    from rcomp.data import catalog as data
    from rcomp.models import catalog as models
    from rcomp.pruning import catalog as pruning
    from rcomp.quant import catalog as quant
    from rcomp.train import catalog as train

    return [
        ("rcomp/attacks/catalog.py", attacks.ATTACKS.builtin_names()),
        ("rcomp/attacks/catalog.py", attacks.LOSSES),
        ("rcomp/attacks/catalog.py", attacks.NORMS),
        ("rcomp/pruning/catalog.py", pruning.IMPORTANCES.builtin_names()),
        ("rcomp/pruning/catalog.py", pruning.SCOPES),
        ("rcomp/quant/catalog.py", quant.MODES.builtin_names()),
        ("rcomp/quant/catalog.py", quant.BACKENDS),
        ("rcomp/models/catalog.py", models.ARCHITECTURES.builtin_names()),
        ("rcomp/data/catalog.py", data.DATASETS.builtin_names()),
        ("rcomp/train/catalog.py", train.ADV_MODES),
        ("rcomp/train/catalog.py", train.OPTIMIZERS),
        ("rcomp/train/catalog.py", train.SCHEDULES),
    ]


def _literal_lists(tree: ast.AST):
    """(line, strings) of every literal tuple, list or set of strings, and of every dict's string keys."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        strings = [e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if strings:
            yield node.lineno, strings


#: lists that share names with a catalogue but are something else: (module, the list's strings)
ALLOWED = {
    # the auto suite's stage keys, in cascade order (apgd-ce is no attack name; they key results)
    ("rcomp/attacks/auto.py", ("apgd-ce", "apgd-t", "square")),
}


def _duplicates(files, catalogues, root=ROOT):
    bad = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        for line, strings in _literal_lists(ast.parse(f.read_text())):
            for home, names in catalogues:
                if rel == home or rel.endswith("/catalog.py") or (rel, tuple(strings)) in ALLOWED:
                    continue
                hits = sorted(set(strings) & set(names))
                if len(hits) >= 2:
                    bad.append(f"{rel}:{line} lists {', '.join(hits)} (declared in {home})")
    return bad


def test_every_catalogue_name_is_listed_once():
    """Each family's names live in its catalogue only: no other module of the package holds a literal
    tuple, list, set or dict of two or more of them (a second list that could drift)."""
    cats = _catalogues()
    assert all(len(names) >= 2 for _, names in cats)
    files = sorted(PKG.rglob("*.py"))
    bad = _duplicates(files, cats)
    assert not bad, "\n".join(bad)


def test_the_once_rule_catches_a_second_list(tmp_path):
    """The check itself can fail: a module repeating two attack names is reported."""
    f = tmp_path / "rcomp" / "stages" / "x.py"
    f.parent.mkdir(parents=True)
    f.write_text('NAMES = ("pgd", "fgsm")\nD = {"l1": 1, "taylor": 2}\nOK = ("pgd",)\n')
    from rcomp.attacks.catalog import ATTACKS
    from rcomp.pruning.catalog import IMPORTANCES

    found = _duplicates([f], [("rcomp/attacks/catalog.py", ATTACKS.builtin_names()),
                              ("rcomp/pruning/catalog.py", IMPORTANCES.builtin_names())], root=tmp_path)
    assert len(found) == 2 and "fgsm, pgd" in found[0] and "l1, taylor" in found[1]


def _mode_compares(files, modes, root=ROOT):
    """``file:line`` of every comparison with a quantization mode name spelled as a literal
    (``q["mode"] == "int8"``), outside the quantization catalogue."""
    bad = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel == "rcomp/quant/catalog.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in modes
                                                     for c in (node.left, *node.comparators)):
                bad.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    return bad


def test_quantization_modes_are_told_apart_by_their_catalogue_only():
    """No module compares a mode name: it asks rcomp.quant.catalog (is_real, label, an entry's extra), so a
    new scheme is one entry there, not another string to find in ONNX export, stages or loading."""
    from rcomp.quant.catalog import MODES

    bad = _mode_compares(sorted(PKG.rglob("*.py")), set(MODES.builtin_names()))
    assert not bad, "\n".join(bad)


def test_the_mode_rule_catches_a_literal_compare(tmp_path):
    f = tmp_path / "rcomp" / "onnx" / "x.py"
    f.parent.mkdir(parents=True)
    f.write_text('def f(q):\n    return q.get("mode") != "simulated" or "int8" == q["mode"] or q == "int4"\n')
    found = _mode_compares([f], {"int8", "simulated"}, root=tmp_path)
    assert found == ['rcomp/onnx/x.py:2 q.get(\'mode\') != \'simulated\'', "rcomp/onnx/x.py:2 'int8' == q['mode']"]


def _prefix_tests(files, prefixes, root=ROOT):
    """``file:line`` of every ``x.startswith("timm:")``-like test of a source prefix outside the architecture
    catalogue and the source's own module."""
    bad = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel in ("rcomp/models/catalog.py", "rcomp/models/timm_source.py"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("startswith", "removeprefix", "partition") and \
                    any(isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.rstrip(":") in prefixes
                        and a.value.endswith(":") for a in node.args):
                bad.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    return bad


def test_architecture_source_prefixes_come_from_their_catalogue(tmp_path):
    """``timm:`` is the architecture catalogue's to recognise (prefix_source, is_user_factory): options,
    spec and convert ask it, so another source is one entry there."""
    from rcomp.models.catalog import SOURCES

    prefixes = {e.get("prefix") for e in SOURCES.entries() if e.get("prefix")}
    assert "timm" in prefixes
    bad = _prefix_tests(sorted(PKG.rglob("*.py")), prefixes)
    assert not bad, "\n".join(bad)
    f = tmp_path / "rcomp" / "options.py"  # the check can fail
    f.parent.mkdir()
    f.write_text('def f(v):\n    return ":" in v and not str(v).startswith("timm:")\n')
    assert _prefix_tests([f], prefixes, root=tmp_path) == ['rcomp/options.py:2 str(v).startswith(\'timm:\')']


def test_a_new_prefix_source_is_no_user_factory(monkeypatch):
    from rcomp.catalog import Entry
    from rcomp.models import catalog

    assert catalog.user_factory_from_file("timm:resnet18") is None
    assert catalog.user_factory_from_file("hub:net") and catalog.is_user_factory("hub:net")
    monkeypatch.setitem(catalog.SOURCES.builtin, "hub", Entry("hub", "x:y", "a test source", extra={"prefix": "hub"}))
    assert catalog.user_factory_from_file("hub:net") is None and not catalog.is_user_factory("hub:net")
    assert catalog.is_user_factory("pkg.mod:fn")


def test_catalogue_options_are_declared():
    """Every option an attack or importance entry takes is a declared option of its stage."""
    from rcomp.attacks.catalog import ATTACKS, OPTIONS
    from rcomp.options import options_of
    from rcomp.pruning.catalog import IMPORTANCES
    from rcomp.stages import attack, prune

    attack_opts = {o.name for o in options_of(attack.AttackOptions)}
    assert set(OPTIONS) - {"p_init"} <= attack_opts  # p_init: a library keyword of square only
    for e in ATTACKS.entries(plugins=False):
        assert set(e.takes) <= set(OPTIONS), e.name
        assert set(e.get("fixed", {})) <= set(OPTIONS) and set(e.get("refusal", {})) <= set(OPTIONS), e.name
    prune_opts = {o.name for o in options_of(prune.Config)}
    for e in IMPORTANCES.entries(plugins=False):
        assert set(e.takes) <= prune_opts, e.name


def test_every_catalogue_ref_resolves():
    """Each built-in entry's "module:object" names real code (a name without code is impossible)."""
    for _, cat in _catalogue_objects():
        for e in cat.entries(plugins=False):
            if e.ref.endswith(":ARCHITECTURES"):
                continue
            assert e.load() is not None, (cat.family, e.name)
            for key in ("prepare", "native_shape", "names"):
                if e.get(key):
                    from rcomp.catalog import Entry

                    assert callable(Entry(key, e.get(key)).load()), (e.name, key)


def _catalogue_objects():
    from rcomp.attacks.catalog import ATTACKS
    from rcomp.data.catalog import DATASETS
    from rcomp.models.catalog import ARCHITECTURES, SOURCES
    from rcomp.pruning.catalog import IMPORTANCES
    from rcomp.quant.catalog import MODES

    return [("attacks", ATTACKS), ("data", DATASETS), ("models", ARCHITECTURES), ("sources", SOURCES),
            ("pruning", IMPORTANCES), ("quant", MODES)]


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
