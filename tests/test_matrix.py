"""Every legal combination works (issue 22): the generated combination matrix.

The cells (tests/matrix_cells.py) are generated from rcomp's stage and option declarations, its attack
table and the model-kind table, reduced to all-pairs coverage. Each cell must end in one of two ways:

* exit 0 with a valid output: a checkpoint that ``rcomp.load`` reloads and that gives finite logits, an
  examples file inside the eps ball, JSON that parses, every figure finite; or
* an up-front refusal: exit 2 (``RcompError`` in Python), one line, nothing written, and no model loaded
  and no data read (spied on), refused the same way from the plain command line.

A command on the dense model must work (the floor that keeps "refuse everything" from passing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.matrix_cells import (
    EPS,
    EXAMPLES,
    MODEL_KINDS,
    TINY,
    Action,
    Cell,
    actions,
    add_attack,
    all_pairs,
    argv_options,
    attack_table,
    declared,
    file_options,
    finite_figures,
    full_product_size,
    matrix,
    snapshot,
    ways_for,
)

pytestmark = pytest.mark.slow

CELLS = matrix()


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def kinds(trained_digits, tmp_path_factory) -> dict[str, Path]:
    """Every model kind of MODEL_KINDS, made once by rcomp's own stage functions from a trained convnet8."""
    import rcomp

    folder = tmp_path_factory.mktemp("kinds")
    paths: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind in paths:
            return paths[kind]
        recipe = MODEL_KINDS[kind]
        if recipe is None:
            paths[kind] = Path(trained_digits)
            return paths[kind]
        parent, stage, options = recipe
        src = make(parent)
        extra = {"data": "digits"} if stage == "finetune" else {}
        out = folder / f"{kind}.safetensors"
        res = getattr(rcomp, stage)(str(src), log=_quiet, output=out, **options, **extra)
        assert res.path == out and res.report["path"] == str(out)
        paths[kind] = out
        return out

    for k in MODEL_KINDS:
        make(k)
    return paths


@pytest.fixture(scope="module")
def examples(kinds, tmp_path_factory) -> Path:
    """Adversarial examples of the dense model (for ``attack --from``)."""
    import rcomp

    out = tmp_path_factory.mktemp("examples") / "adv.safetensors"
    rcomp.attack(str(kinds["dense"]), log=_quiet, data="digits", n=8, attack="pgd", eps=EPS, steps=1, output=out)
    return out


@pytest.fixture
def spy(monkeypatch):
    """Counts model loads and dataset reads: a refusal must come before either."""
    import rcomp.data.registry as data_registry
    import rcomp.models.loading as loading

    calls = {"load": 0, "data": 0}
    real_load, real_data = loading.load, data_registry.get_dataset

    def load(*a, **kw):
        calls["load"] += 1
        return real_load(*a, **kw)

    def get_dataset(*a, **kw):
        calls["data"] += 1
        return real_data(*a, **kw)

    monkeypatch.setattr(loading, "load", load)
    monkeypatch.setattr(data_registry, "get_dataset", get_dataset)
    return calls


# ---------------------------------------------------------------------------------------------
# running one cell
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    refused: str | None = None          # the refusal's one line
    code: int = 0
    stdout: str = ""
    stderr: str = ""
    report: dict | None = None          # --json or the Python API's result's .report
    output: Path | None = None          # what the cell wrote, if anything
    seconds: float = 0.0


def _options(action: Action, examples: Path) -> dict:
    return {k: (str(examples) if v == EXAMPLES else v) for k, v in action.options.items()}


def _output(cell: Cell, work: Path) -> Path | None:
    cmd = cell.action.command
    if cmd == "export":
        return work / "out.onnx"
    if cmd in ("prune", "quantize", "finetune") or (cell.way == "recipe" and cmd != "info"):
        return work / ("out.txt" if cmd == "bench" else "out.safetensors")
    if cell.save == "-o":
        return work / ("out.txt" if cmd == "bench" else "out.safetensors")
    return None


def run_cell(cell: Cell, kinds: dict[str, Path], examples: Path, work: Path) -> Outcome:
    import yaml

    import rcomp
    from rcomp.errors import RcompError

    work.mkdir(parents=True, exist_ok=True)
    cmd, ckpt = cell.action.command, kinds[cell.kind]
    opts = _options(cell.action, examples)
    if cell.eps is not None:
        opts["eps"] = cell.eps
    out = _output(cell, work)
    o_args = ["-o", str(out)] if out is not None else []
    t0 = time.perf_counter()
    if cell.way == "api":
        fn = getattr(rcomp, cmd)
        kw = {**opts, **({"output": out} if out is not None else {})}  # the API writes only what output= names
        try:
            res = fn([str(ckpt)] if cmd == "bench" else str(ckpt), log=_quiet, **kw)
        except RcompError as exc:
            return Outcome(refused=str(exc), code=2, seconds=time.perf_counter() - t0)
        assert isinstance(res, rcomp.Result) and res.path == out, res
        assert (res.model is not None) == (cmd in ("prune", "quantize", "finetune")), res.model
        return Outcome(report=res.report, output=out, seconds=time.perf_counter() - t0)
    if cell.way == "recipe":
        stage = {"name": "cell", "command": cmd, "input": str(ckpt), "options": file_options(cmd, opts),
                 "output": out.name}
        recipe = work / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"name": "cell", "stages": [stage]}))
        out = work / "run" / out.name
        args = ["run", recipe, "--out-dir", work / "run"]
        res = run_cli(*args)
    elif cell.way == "config":
        conf = work / "config.yaml"
        conf.write_text(yaml.safe_dump(file_options(cmd, opts)))
        res = run_cli(cmd, ckpt, "--config", conf, *o_args)
    elif cell.way == "pipe":
        res = run_cli(cmd, *argv_options(cmd, opts), *o_args, stdin=f"{ckpt}\n")
    else:
        res = run_cli(cmd, ckpt, *argv_options(cmd, opts), *o_args, *(["--json"] if cell.way == "json" else []))
    secs = time.perf_counter() - t0
    outcome = Outcome(code=res.code, stdout=res.stdout, stderr=res.stderr, output=out, seconds=secs)
    if res.code == 2:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        outcome.refused = lines[-1] if lines else ""
        # a recipe logs "[1/1] stage: command" before a stage runs; else the refusal is the only line
        assert all(ln.startswith("[") for ln in lines[:-1]) and (len(lines) == 1 or cell.way == "recipe"), \
            f"exit 2 after work was done, not an up-front refusal:\n{res.stderr[-3000:]}"
        assert res.stdout == "", res.stdout
    elif cell.way == "json" and res.code == 0:
        outcome.report = json.loads(res.stdout)
    return outcome


def _load_checked(path: Path, command: str) -> None:
    import torch

    import rcomp

    model = rcomp.load(path)
    assert model.meta.history[-1]["command"] == command
    finite_figures(model.meta.history[-1].get("metrics"), "history metrics")
    with torch.inference_mode():
        logits = model(torch.rand(4, *model.meta.input.shape))
    assert logits.shape == (4, model.meta.num_classes) and bool(torch.isfinite(logits).all())


def check_valid(cell: Cell, o: Outcome) -> None:
    """Exit 0 with a valid, reloadable output and finite figures."""
    assert o.code == 0, (o.code, o.stderr[-2000:])
    cmd = cell.action.command
    if o.report is not None:
        finite_figures(o.report)
    if cmd in ("prune", "quantize", "finetune"):
        _load_checked(o.output, cmd)
        if cell.way in ("flags", "pipe"):
            assert o.stdout.strip() == str(o.output)
        if cell.way in ("json", "api"):
            assert o.report["path"] == str(o.output)
    elif cmd == "export":  # an ONNX file (rcomp checks it against the model before publishing it)
        assert o.output.stat().st_size > 0
    elif cmd == "info":
        if cell.way == "json":
            assert o.report["arch"] == "convnet8" and len(o.report["sha256"]) == 64
        else:
            assert "sha256" in o.stdout
    elif cmd == "attack":
        if o.report is not None:
            assert 0 <= o.report["worst_case_acc"] <= o.report["clean_acc"] <= 1, o.report
            assert o.report["n"] == TINY["n"]
        else:
            assert o.stdout.strip() and "nan" not in o.stdout.lower(), o.stdout
        if o.output is not None and "from_file" not in cell.action.options:
            _examples_checked(o.output, cell.action)
    elif cmd == "bench":
        if o.report is not None:
            (m,) = o.report["models"]
            assert 0 <= m["worst_case_acc"] <= m["clean_acc"] <= 1
        else:
            assert o.stdout.strip() and "nan" not in o.stdout.lower()
        if o.output is not None:
            text = o.output.read_text()
            assert text.strip()
            if cell.way == "json":
                finite_figures(json.loads(text))


def _examples_checked(path: Path, action: Action) -> None:
    import torch

    from rcomp.io.examples import load_examples

    x, xa, y, info = load_examples(path)
    assert len(y) == TINY["n"] and x.shape == xa.shape
    assert bool(torch.isfinite(xa).all()) and float(xa.min()) >= 0 and float(xa.max()) <= 1
    assert float((xa - x).abs().max()) <= float(EPS) + 1e-6
    assert isinstance(info, dict) and info, info  # the attack's parameters (their layout is the writer's)


#: variants rcomp refuses on the dense model, and why (each must still be refused up front)
REFUSED_ON_DENSE = {"prune:bn-scale": "convnet8 has no BatchNorm layers"}


def must_work(cell: Cell) -> bool:
    """The floor: every command works on the dense model, except REFUSED_ON_DENSE (several attacks or eps
    saved in one file may be refused too: a file holds one eps, and one attack's examples unless the
    per-example worst case is saved; a recipe's attack stage always saves)."""
    saves = cell.save == "-o" or (cell.way == "recipe" and cell.action.command == "attack")
    return cell.kind == "dense" and cell.action.name not in REFUSED_ON_DENSE and not (saves and cell.several)


def check_cell(cell: Cell, kinds, examples, work: Path, spy) -> Outcome:
    before = snapshot(work, *{p.parent for p in kinds.values()})
    o = run_cell(cell, kinds, examples, work / "cell")
    if o.refused is None:
        check_valid(cell, o)
        written = set(snapshot(work, *{p.parent for p in kinds.values()})) - set(before)
        expected = {str(p) for p in (o.output, work / "cell" / "recipe.yaml", work / "cell" / "config.yaml")}
        stray = {p for p in written - expected if "/.rcomp-run/" not in p}
        assert not stray, f"files left besides the output: {sorted(stray)}"
        _same_bytes_as_flags(cell, o, kinds, examples, work)
        return o
    msg = o.refused
    assert not must_work(cell), f"{cell.id} must work, but was refused: {msg}"
    assert "internal error" not in msg and "Traceback" not in msg, msg
    assert "\n" not in msg.strip() and ";" in msg, f"one line naming the problem; then the fix: {msg}"
    assert spy["load"] == 0 and spy["data"] == 0, f"refused after loading a model or data ({spy}): {msg}"
    after = snapshot(work, *{p.parent for p in kinds.values()})
    assert after == before | {k: v for k, v in after.items() if k.endswith(("recipe.yaml", "config.yaml"))}, \
        "a refusal wrote files"
    if cell.way != "flags":  # the same combination, refused from the plain command line too
        flags = run_cell(dataclasses.replace(cell, way="flags"), kinds, examples, work / "flags")
        assert flags.refused is not None, f"refused via {cell.way} ({msg}) but the command line accepts it"
    return o


#: sha256 of what the plain command line wrote, per (kind, action, save): every way must write the same bytes
_FLAGS_SHA: dict[tuple, str] = {}


def _same_bytes_as_flags(cell: Cell, o: Outcome, kinds, examples, work: Path) -> None:
    """A checkpoint or examples file is the same bytes whichever way the command was called (recipes and the
    API build the same config and call the same stage; SOURCE_DATE_EPOCH fixes the history's times)."""
    import hashlib

    if o.output is None or cell.action.command in ("bench", "export") or "from_file" in cell.action.options:
        return
    key = (cell.kind, cell.action.name, "-o" if cell.way == "recipe" and cell.action.saves else cell.save, cell.eps)
    sha = hashlib.sha256(o.output.read_bytes()).hexdigest()
    if cell.way == "flags":
        _FLAGS_SHA[key] = sha
        return
    if key not in _FLAGS_SHA:
        flags = run_cell(dataclasses.replace(cell, way="flags", save=key[2]), kinds, examples, work / "flags")
        assert flags.refused is None and flags.code == 0, flags.stderr[-2000:]
        _FLAGS_SHA[key] = hashlib.sha256(flags.output.read_bytes()).hexdigest()
    assert sha == _FLAGS_SHA[key], f"{cell.way} wrote other bytes than the command line for {cell.id}"


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_cell(cell: Cell, kinds, examples, tmp_path, spy):
    o = check_cell(cell, kinds, examples, tmp_path, spy)
    log = os.environ.get("RCOMP_MATRIX_LOG")  # one JSON line per cell, for reports: what ran, what was refused
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"cell": cell.id, "refused": o.refused, "seconds": round(o.seconds, 3)}) + "\n")


# ---------------------------------------------------------------------------------------------
# the matrix itself
# ---------------------------------------------------------------------------------------------

def test_the_matrix_covers_every_kind_with_every_command_and_every_pair():
    kinds = {c.kind for c in CELLS}
    assert kinds == set(MODEL_KINDS)
    names = [a.name for a in actions()]
    assert {f"attack:{a}" for a in attack_table()} <= set(names)
    for kind in MODEL_KINDS:  # every kind x every command variant
        assert {c.action.name for c in CELLS if c.kind == kind} == set(names), kind
    for a in actions():  # every command x every way it offers
        assert {c.way for c in CELLS if c.action.name == a.name} == set(ways_for(a.command)), a.name
    assert {c.save for c in CELLS if c.action.command == "attack" and c.action.saves} == {"", "-o"}
    assert {c.eps for c in CELLS if c.action.command in ("attack", "bench")} >= {EPS, f"0.05,{EPS}"}
    assert len(CELLS) < full_product_size()


def test_a_new_attack_grows_the_matrix_and_its_cells_run(monkeypatch, kinds, examples, tmp_path, spy):
    """A trivial attack added to the attack table gets its own cells (every kind, its budgets probed) and
    joins the several-attack cells; they run like the others."""
    import torch

    from rcomp.attacks.base import Attack

    class Nudge(Attack):
        name = "nudge"

        def __init__(self, eps, norm="linf", *, steps=None, alpha=None, random_start=None, restarts=1, loss=None,
                     targeted=False, seed=None):
            super().__init__(eps, norm, loss=loss or "ce", targeted=targeted, seed=seed)

        def perturb(self, model, x, y, target):
            return x + self.eps * torch.sign(0.5 - x)

    before = matrix()
    add_attack(monkeypatch, "nudge", Nudge,
               takes=("steps", "alpha", "random_start", "restarts", "loss", "targeted"))
    after = matrix()
    assert len(after) > len(before)
    new = [c for c in after if c.action.name == "attack:nudge"]
    assert {c.kind for c in new} == set(MODEL_KINDS)
    assert all("nudge" in a.attacks for a in actions() if a.name in ("attack:cascade", "bench:singles"))
    for c in [*new, next(c for c in after if c.action.name == "bench:singles")]:
        spy.update(load=0, data=0)
        o = check_cell(c, kinds, examples, tmp_path / c.id, spy)
        saved = c.save == "-o" or (c.way == "recipe" and c.action.command == "attack")
        if not (saved and c.several):  # a plain attack works on every kind (a saved sweep may be refused)
            assert o.refused is None, (c.id, o.refused)


def test_all_pairs_covers_every_valid_pair_property():
    """all_pairs on random factor tables and constraints: only valid combinations, every valid pair covered,
    the same answer twice."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.integers(0, 2**16))
    def check(sizes, seed):
        factors = {f"f{i}": list(range(n)) for i, n in enumerate(sizes)}

        def valid(c):
            return (sum(c.values()) * 7 + seed) % 5 != 0

        chosen = all_pairs(factors, valid)
        assert all(valid(c) for c in chosen)
        assert chosen == all_pairs(factors, valid)
        import itertools

        full = [dict(zip(factors, v, strict=True)) for v in itertools.product(*factors.values())]
        full = [c for c in full if valid(c)]
        for a, b in itertools.combinations(factors, 2):
            want = {(c[a], c[b]) for c in full}
            assert want == {(c[a], c[b]) for c in chosen}
        assert len(chosen) <= max(len(full), 0)

    check()


def test_budgets_come_from_the_declarations():
    """Each cell gets the tiny budgets its command declares and accepts, never one it refuses."""
    acts = {a.name: a for a in actions()}
    assert acts["attack:square"].options.get("queries") == TINY["queries"]
    assert "steps" not in acts["attack:square"].options  # square counts queries, not steps
    assert "steps" in acts["attack:pgd"].options and "queries" not in acts["attack:pgd"].options
    for a in acts.values():
        decl = declared(a.command)
        assert set(a.options) <= set(decl), a.name
    assert math.isclose(float(acts["attack:pgd"].options["eps"]), float(EPS))


def test_a_refusal_after_loading_fails_its_cell(monkeypatch, kinds, examples, tmp_path, spy):
    """The oracle can fail: with the header check of prune switched off, pruning an int8 model is still
    refused, but only by the pruner, after the model was loaded; the cell must fail on that."""
    import rcomp.stages.prune as prune_stage

    monkeypatch.setattr(prune_stage, "check_source", lambda *a, **kw: None)
    action = next(a for a in actions() if a.name == "prune:l1")
    with pytest.raises(AssertionError, match="after loading"):
        check_cell(Cell("int8", action, "flags", None), kinds, examples, tmp_path, spy)


def test_api_replays_saved_examples_against_a_loaded_model_as_against_its_path(kinds, examples):
    """rcomp.attack(..., from_file=F) is the API's `rcomp attack --from F` (it used to fail with an internal error)."""
    import rcomp

    by_path = rcomp.attack(str(kinds["pruned"]), from_file=examples, log=_quiet).report
    by_model = rcomp.attack(rcomp.load(kinds["pruned"]), from_file=examples, log=_quiet).report
    assert by_path["source"]["path"] == str(examples) and by_path["n"] == 8
    for key in ("clean_acc", "robust_acc", "worst_case_acc", "n"):
        assert by_model[key] == by_path[key]
