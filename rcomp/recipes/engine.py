"""Run a YAML recipe: stages are rcomp stages with named inputs and outputs, optionally swept over a grid.

A recipe::

    name: my-sweep
    vars: {eps: 0.1}                     # usable as {eps} in any string; --set eps=0.05 overrides
    defaults: {data: digits, seed: 0}    # options given to every stage whose command takes them
    stages:
      - name: base                       # unique; {var} templates allowed when the stage has a grid
        command: finetune                # convert, prune, quantize, finetune, attack or bench
        options: {arch: convnet8, epochs: 10}
      - name: pruned-{ratio}
        command: prune
        input: base                      # a stage name (its output) or a file path
        grid: {ratio: [0.3, 0.5]}        # one stage per combination
        options: {ratio: "{ratio}"}
      - name: report
        command: bench
        inputs: [base, "pruned-*"]       # several inputs; * matches stage names; {best: [a, b], by: bench}
                                         # is the one stage bench (format: json) found more robust
        options: {attack: "fgsm,pgd", eps: "{eps}", format: json}
        output: bench.json               # default: <name>.safetensors (.onnx if it writes ONNX) in the output folder

Options are the command's option names, validated by the stage's own declarations (the same as the
command line's) into a typed config, and the stage is called directly. Everything is checked before
any stage runs (unknown command or option, a value out of range, missing input, cycle, duplicate
names, an output outside the output folder, options only the command line may set), naming the
recipe line. A stage whose output exists and whose config and inputs (by sha256) are unchanged since
it last ran is skipped, so an interrupted sweep resumes.

Some stages write more than their output: ``finetune`` with ``save-at: [9, 36]`` also writes the model
after 9 and 36 steps (``pruned-ft-s90.safetensors`` -> ``pruned-ft-s9.safetensors``...). Each such file
is named, for the other stages' inputs and globs, by its file name without ``.safetensors``
(``pruned-ft-s9``), listed just before the stage that writes it, and stamped with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcomp.errors import AlreadyReported, RcompError
from rcomp.recipes.choice import Choice
from rcomp.text import printable

STAMP_DIR = ".rcomp-run"
#: per-example records of a recipe's stages split over torchrun processes, when the stage names no records folder
RECORDS_DIR = ".rcomp-records"
#: a recipe expands to at most this many stages unless the user raises it (rcomp run --max-stages)
MAX_STAGES = 1000
_VAR_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=@-]{0,127}")
_TOP_KEYS = {"name", "description", "vars", "defaults", "stages", "out_dir"}
_STAGE_KEYS = {"name", "command", "options", "input", "inputs", "output", "grid"}


@dataclass
class Stage:
    name: str
    command: str
    options: dict[str, Any]
    inputs: list[Any]  # stage names, globs or files (str); inputs chosen at run time (choice.Choice)
    output: str
    line: int
    wild: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    deps: list[str] = field(default_factory=list)
    input_paths: list[str] = field(default_factory=list)
    file_inputs: list[str] = field(default_factory=list)  # inputs that are files, not stage outputs
    config: Any = None
    extras: list[str] = field(default_factory=list)  # files it writes besides its output (relative to the folder)
    choices: list[tuple[int, Any]] = field(default_factory=list)  # (position in the inputs, choice.Choice)
    fixed_paths: list[str] = field(default_factory=list)  # input_paths without the chosen ones
    chosen: bool = False  # input_paths has the run-time choices made (_choose)
    picked: list[dict] = field(default_factory=list)  # what each choice chose, for the run's records


def _line_map(root) -> dict[tuple, int]:
    """Line numbers (1-based) of recipe nodes: ('stages', i) and ('stages', i, key)."""
    import yaml

    lines: dict[tuple, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return lines
    for k, v in root.value:
        lines[(k.value,)] = k.start_mark.line + 1
        if k.value == "stages" and isinstance(v, yaml.SequenceNode):
            for i, item in enumerate(v.value):
                lines[("stages", i)] = item.start_mark.line + 1
                if isinstance(item, yaml.MappingNode):
                    for sk, sv in item.value:
                        lines[("stages", i, sk.value)] = sk.start_mark.line + 1
                        if isinstance(sv, yaml.MappingNode):
                            for ok, _ in sv.value:
                                lines[("stages", i, sk.value, ok.value)] = ok.start_mark.line + 1
    return lines


def _subst(value: Any, env: dict[str, Any], where: str) -> Any:
    if isinstance(value, str):
        def rep(m):
            if m.group(1) not in env:
                raise RcompError(f"{where}: unknown variable {{{m.group(1)}}}; define it under vars: or in a grid")
            return str(env[m.group(1)])

        full = _VAR_RE.fullmatch(value)
        if full and full.group(1) in env:
            return env[full.group(1)]
        return _VAR_RE.sub(rep, value)
    if isinstance(value, list):
        return [_subst(v, env, where) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, env, where) for k, v in value.items()}
    return value


def _coerce(text: str) -> Any:
    from rcomp.safeyaml import load_yaml_text

    try:
        return load_yaml_text(text, what="--set value")
    except RcompError:
        return text


class Recipe:
    def __init__(self, text: str, source: str = "recipe", overrides: dict[str, str] | None = None,
                 max_stages: int = MAX_STAGES, path: Path | None = None):
        from rcomp.safeyaml import compose_yaml_text, load_yaml_text

        self.source = source
        self.path = path  # the recipe file: no stage may write over it
        self.max_stages = max_stages
        self._stage_overrides: dict[str, dict[str, Any]] = {}
        doc = load_yaml_text(text, what=source)
        if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list) or not doc["stages"]:
            raise RcompError(f"{source}: a recipe is a mapping with a non-empty 'stages:' list")
        unknown = set(doc) - _TOP_KEYS
        if unknown:
            raise RcompError(f"{source}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}")
        self.lines = _line_map(compose_yaml_text(text, what=source))
        self.name = str(doc.get("name", Path(source).stem))
        self.description = doc.get("description", "")
        for key in ("vars", "defaults"):
            if doc.get(key) is not None and not isinstance(doc[key], dict):
                raise RcompError(f"{self.where(key)}: {key} must be a mapping of names to values, e.g. "
                                 f"{key}: {{eps: 0.1}}")
        self.vars = dict(doc.get("vars") or {})
        self.defaults = dict(doc.get("defaults") or {})
        self.out_dir = _recipe_out_dir(doc.get("out_dir"), self.where("out_dir"))
        for key, val in (overrides or {}).items():
            if "." in key:
                stage_name, opt = key.split(".", 1)
                self._stage_overrides.setdefault(stage_name, {})[opt] = _coerce(val)
            else:
                self.vars[key] = _coerce(val)
        self.defaults = _subst(self.defaults, self.vars, f"{source} defaults")
        self.stages = self._expand(doc["stages"])

    def without(self, names) -> list[str]:
        """Drop the stages named and every stage that reads one of them by name, transitively (a glob input
        just matches fewer); returns the names dropped, in recipe order. A stage that reads one of a dropped
        stage's extra files (finetune save-at) by name is not seen here: :func:`plan` then refuses it."""
        dropped = set(names)
        grew = True
        while grew:
            grew = False
            for st in self.stages:
                if st.name not in dropped and dropped.intersection(_refs(st)):
                    dropped.add(st.name)
                    grew = True
        gone = [st.name for st in self.stages if st.name in dropped]
        self.stages = [st for st in self.stages if st.name not in dropped]
        return gone

    def default_out_dir(self) -> str:
        """The folder used without --out-dir: the recipe's out_dir, else its name (both relative, no '..')."""
        return self.out_dir or _recipe_out_dir(self.name, f"{self.where('name')}: as the default output folder, name")

    def where(self, *key) -> str:
        line = self.lines.get(tuple(key)) or self.lines.get(tuple(key[:2]))
        return f"{self.source} line {line}" if line else self.source

    def _grid(self, raw: dict, i: int, w: str) -> dict[str, list]:
        grid = _subst(raw.get("grid") or {}, self.vars, w)
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise RcompError(f"{self.where('stages', i, 'grid')}: grid maps variable names to non-empty lists")
        return grid

    def _check_count(self, grids: list[dict[str, list]]) -> None:
        total = sum(math.prod(len(v) for v in g.values()) for g in grids)
        if total > self.max_stages:
            raise RcompError(f"{self.source}: the recipe expands to {total:,} stages, more than the limit of "
                             f"{self.max_stages:,}; shrink its grids or raise the limit with --max-stages")

    def _expand(self, raw_stages: list) -> list[Stage]:
        checked = []
        for i, raw in enumerate(raw_stages):
            w = self.where("stages", i)
            if not isinstance(raw, dict):
                raise RcompError(f"{w}: a stage is a mapping with name, command and options")
            bad = set(raw) - _STAGE_KEYS
            if bad:
                key = sorted(map(str, bad))[0]
                raise RcompError(f"{self.where('stages', i, key)}: unknown stage key {key!r}")
            if "name" not in raw or "command" not in raw:
                raise RcompError(f"{w}: a stage needs a name and a command")
            checked.append((i, raw, w, self._grid(raw, i, w)))
        self._check_count([g for *_, g in checked])
        stages: list[Stage] = []
        for i, raw, w, grid in checked:
            keys = list(grid)
            for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
                env = {**self.vars, **dict(zip(keys, combo, strict=True))}
                stages.append(self._stage(i, raw, w, env))
        return stages

    def _stage(self, i: int, raw: dict, w: str, env: dict[str, Any]) -> Stage:
        name = str(_subst(raw["name"], env, w))
        if not _NAME_RE.fullmatch(name) or ".." in name:
            raise RcompError(f"{w}: stage name {name!r} must be a plain name (letters, digits, _ . - + = @; no "
                             "slashes), since it names files in the output folder")
        options = _subst(raw.get("options") or {}, env, w)
        if not isinstance(options, dict):
            raise RcompError(f"{self.where('stages', i, 'options')}: options must be a mapping")
        wild, exact = {}, {}
        for pattern, ov in self._stage_overrides.items():
            if pattern == name:
                exact.update(ov)
            elif fnmatch.fnmatchcase(name, pattern):
                wild.update(ov)  # applied only where the command takes the option
        # --set overrides the recipe: a pattern's value beats the stage's own, its exact name beats both
        options.update(exact)
        wild = {k: v for k, v in wild.items() if k not in exact}
        ins = raw.get("inputs", [raw["input"]] if raw.get("input") is not None else [])
        iw = self.where("stages", i, "inputs" if "inputs" in raw else "input")
        ins = [Choice.parse(_subst(x, env, w), iw) if isinstance(x, dict) else str(_subst(x, env, w))
               for x in (ins if isinstance(ins, list) else [ins])]
        default = f"{name}.onnx" if writes_onnx(str(raw["command"]), options) else f"{name}.safetensors"
        out = str(_subst(raw.get("output", default), env, w))
        return Stage(name=name, command=str(raw["command"]), options=options, wild=wild, inputs=ins, output=out,
                     line=self.lines.get(("stages", i), 0), index=i)


def writes_onnx(command: str, options: dict[str, Any]) -> bool:
    """Whether a stage writes an ONNX file (export, quantize --backend onnxruntime): its output defaults to
    NAME.onnx, and it needs the ONNX extra."""
    from rcomp.quant.catalog import ONNXRUNTIME

    return command == "export" or (command == "quantize" and options.get("backend") == ONNXRUNTIME)


def _refs(st: Stage) -> list[str]:
    """The names a stage's inputs refer to (a choice's candidates and bench stage included)."""
    return [r for x in st.inputs for r in (x.refs() if isinstance(x, Choice) else [x])]


def _recipe_out_dir(value: Any, where: str) -> str | None:
    """A recipe's own ``out_dir``: a relative folder without '..' (only --out-dir may name any folder)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RcompError(f"{where}: out_dir must be a folder name")
    p = Path(value)
    if p.is_absolute() or ".." in p.parts:
        raise RcompError(f"{where}: out_dir {printable(repr(value), 80)} must be a relative folder without '..' (a "
                         "recipe writes only below where it is run); give another folder with --out-dir")
    return value


def load_recipe(path: Path, overrides: dict[str, str] | None = None, max_stages: int = MAX_STAGES) -> Recipe:
    from rcomp.safeyaml import read_yaml_source

    path = Path(path)
    return Recipe(read_yaml_source(path, what="recipe"), source=str(path), overrides=overrides,
                  max_stages=max_stages, path=path)


# ------------------------------------------------------------------------------------------
# checking: every stage's options become its typed config before anything runs
# ------------------------------------------------------------------------------------------

def _inside(out_dir: Path, rel: str, w: str) -> Path:
    """``out_dir / rel``, refusing anything that would land outside ``out_dir``."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise RcompError(f"{w}: output {rel!r} must be a relative path inside the output folder (no '..', not "
                         "absolute)")
    full = (out_dir / p).resolve()
    if not full.is_relative_to(out_dir.resolve()):
        raise RcompError(f"{w}: output {rel!r} resolves outside the output folder {out_dir}")
    return out_dir / p


def _configure(recipe: Recipe, st: Stage, out: Path, allow_factories: frozenset[str], w: str) -> Any:
    from rcomp.options import make_config, option_index
    from rcomp.stages import get_stage

    cls = get_stage(st.command).config
    idx = option_index(cls)
    takes = {k: v for k, v in recipe.defaults.items() if str(k).replace("_", "-").lower() in idx}
    takes.update(st.options)
    wild = {k: v for k, v in st.wild.items() if str(k).replace("_", "-").lower() in idx}
    if wild:  # --set STAGE-PATTERN.OPTION beats the stage's own value (README: --set overrides)

        def norm(k: Any) -> str:
            return str(k).strip().lstrip("-").replace("_", "-").lower()

        beaten = {norm(k) for k in wild}
        takes = {k: v for k, v in takes.items() if norm(k) not in beaten}
        takes.update(wild)
    named = {k: idx.get(str(k).strip().lstrip("-").replace("_", "-").lower()) for k in takes}
    for key, o in named.items():
        if o is not None and o.name in ("output", "force"):
            raise RcompError(f"{w}: set the output with the stage's output: key, not options.{key}")
    # a user factory named in the recipe runs only if `rcomp run --allow-factory` names it too
    given = {k: v for k, v in takes.items() if named[k] is not None and named[k].name == "arch"
             and v in allow_factories}
    from_file = {k: v for k, v in takes.items() if k not in given}
    for key in st.options:  # an error names the line of the offending option
        line = recipe.lines.get(("stages", st.index, "options", key))
        where = f"{recipe.source} line {line}" if line else w
        make_config(cls, {}, from_file={} if key in given else {key: st.options[key]}, file_source=where,
                    command=st.command, partial=True)
    try:  # options that each parse but do not go together (bits: 4 without simulate): the stage's line
        cfg = make_config(cls, given, from_file=from_file, file_source=w, command=st.command)
    except RcompError as exc:
        if str(exc).startswith(recipe.source):
            raise
        raise RcompError(f"{w}: {exc}") from None
    # the stage's output is the recipe's; a replay (attack --from) writes nothing, so it gets none
    cfg = dataclasses.replace(cfg, output=None if getattr(cfg, "from_file", None) is not None else out, force=True)
    check = getattr(cfg, "check", None)
    if check is not None:  # the config with its output must still be one the stage runs to the end
        try:
            check()
        except RcompError as exc:
            why = " (a recipe's attack stage saves its examples to the stage's output)" if st.command == "attack" else ""
            raise RcompError(f"{w}: {exc}{why}") from None
    return cfg


def plan(recipe: Recipe, out_dir: Path, allow_factories: frozenset[str] = frozenset()) -> list[Stage]:
    """Check the whole recipe and order its stages; raises RcompError naming the line."""
    from rcomp.stages import STAGES

    names: dict[str, Stage] = {}
    outputs: dict[Path, str] = {}
    for st in recipe.stages:
        w = f"{recipe.source} line {st.line}" if st.line else recipe.source
        if st.name in names:
            raise RcompError(f"{w}: stage name {st.name!r} is used twice")
        names[st.name] = st
        if st.command not in STAGES:
            raise RcompError(f"{w}: unknown command {st.command!r}; choose one of {', '.join(STAGES)}")
        out = _inside(out_dir, st.output, w)
        if out in outputs:
            raise RcompError(f"{w}: output {st.output!r} is also stage {outputs[out]!r}'s output")
        outputs[out] = st.name
        st.config = _configure(recipe, st, out, allow_factories, w)
    extras = _extra_outputs(recipe, names, outputs, out_dir)
    for st in recipe.stages:
        _link_inputs(recipe, st, names, out_dir, extras)
        _check_sources(recipe, st, out_dir)
    _check_choices(recipe, names)
    _check_overwrites(recipe, out_dir)
    return _order(recipe, names)


def _extra_outputs(recipe: Recipe, names: dict[str, Stage], outputs: dict[Path, str], out_dir: Path
                   ) -> dict[str, tuple[str, str]]:
    """``{name: (stage that writes it, path)}`` of the files stages write besides their output (the stage
    module's ``extra_outputs(config)``), named by file name without ``.safetensors``; a name or file another
    stage has is refused."""
    from rcomp.stages import get_stage

    found: dict[str, tuple[str, str]] = {}
    for st in recipe.stages:
        fn = getattr(get_stage(st.command).module, "extra_outputs", None)
        st.extras = []
        w = f"{recipe.source} line {st.line}" if st.line else recipe.source
        for p in (fn(st.config) if fn is not None else []):
            try:
                rel = str(Path(p).relative_to(out_dir))
            except ValueError:
                raise RcompError(f"{w}: stage {st.name!r} would also write {printable(str(p), 80)}, outside the "
                                 "output folder") from None
            name = Path(rel).name.removesuffix(".safetensors")
            full = _inside(out_dir, rel, w)
            if name in names or name in found:
                other = names[name].name if name in names else found[name][0]
                raise RcompError(f"{w}: stage {st.name!r} also writes {rel}, named {name!r} like "
                                 f"{'stage' if name in names else 'a file of stage'} {other!r}; rename one of them")
            if full in outputs:
                raise RcompError(f"{w}: stage {st.name!r} also writes {rel}, stage {outputs[full]!r}'s output")
            outputs[full] = st.name
            found[name] = (st.name, str(full))
            st.extras.append(rel)
    return found


def _check_sources(recipe: Recipe, st: Stage, out_dir: Path) -> None:
    """A stage's inputs that are files already (not other stages' outputs) are checked against its options
    from their headers now, before any stage runs (e.g. pruning a quantized checkpoint)."""
    from rcomp.stages import get_stage
    from rcomp.stages.common import check_source

    produced = {str(out_dir / p) for recipe_stage in recipe.stages for p in [recipe_stage.output, *recipe_stage.extras]}
    for p in st.input_paths:
        if p in produced:
            continue
        try:
            check_source(get_stage(st.command).module, st.config, Path(p))
        except RcompError as exc:
            w = f"{recipe.source} line {st.line}" if st.line else recipe.source
            raise RcompError(f"{w}: {exc}") from None


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of an existing file (two names of one file share it: hard links), else None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_overwrites(recipe: Recipe, out_dir: Path) -> None:
    """No stage output is the recipe file or a file some stage reads, nor the same file as another output
    (a hard link, or a symlink the path check let through)."""
    outs = {st.name: out_dir / st.output for st in recipe.stages}
    outs.update({f"{st.name} ({rel})": out_dir / rel for st in recipe.stages for rel in st.extras})
    protected: dict[Any, str] = {}
    if recipe.path is not None:
        protected[Path(recipe.path).resolve()] = "the recipe file"
        protected[_identity(Path(recipe.path))] = "the recipe file"
    for st in recipe.stages:
        for p in st.file_inputs:
            protected.setdefault(Path(p).resolve(), f"an input of stage {st.name!r}")
            protected.setdefault(_identity(Path(p)), f"an input of stage {st.name!r}")
    protected.pop(None, None)
    seen: dict[tuple[int, int], str] = {}
    by_name = {st.name: st for st in recipe.stages}
    for label, out in outs.items():
        st = by_name[label.split(" (")[0]]
        shown = printable(repr(str(out.relative_to(out_dir)) if out.is_relative_to(out_dir) else st.output), 80)
        w = f"{recipe.source} line {st.line}" if st.line else recipe.source
        ident = _identity(out)
        what = protected.get(out.resolve()) or (protected.get(ident) if ident else None)
        if what:
            raise RcompError(f"{w}: output {shown} of stage {st.name!r} is {what}; a "
                             "recipe never writes over its own inputs: choose another output name")
        if ident is not None:
            if ident in seen:
                raise RcompError(f"{w}: output {shown} is the same file as stage "
                                 f"{seen[ident]!r}'s output (a hard link); remove one of them or rename an output")
            seen[ident] = st.name


def _link_inputs(recipe: Recipe, st: Stage, names: dict[str, Stage], out_dir: Path,
                 extras: dict[str, tuple[str, str]] | None = None) -> None:
    """Resolve ``st``'s inputs: stage names and globs over them (a stage's extra files named too, each just
    before its stage), else files; an input chosen at run time (:mod:`rcomp.recipes.choice`) keeps its place
    in ``choices`` and its candidates and bench stage become dependencies."""
    w = f"{recipe.source} line {st.line}" if st.line else recipe.source
    st.deps, st.input_paths, st.file_inputs, st.choices, st.chosen = [], [], [], [], False
    extras = extras or {}
    known = [e for n in names for e in [*(x for x, (owner, _) in extras.items() if owner == n), n]]

    def match(ref: str) -> list[tuple[str, str, str]]:
        """``[(name, path, stage that writes it)]`` of the stage outputs and extra files ``ref`` names."""
        found = [n for n in known if fnmatch.fnmatchcase(n, ref)] if any(c in ref for c in "*?[") else \
            ([ref] if ref in names or ref in extras else [])
        out = []
        for m in found:
            owner, path = extras[m] if m in extras else (m, str(out_dir / names[m].output))
            if owner == st.name:
                raise RcompError(f"{w}: stage {st.name!r} takes its own " +
                                 (f"file {m!r}" if m in extras else "output") + " as input")
            out.append((m, path, owner))
        return out

    def depend(owner: str) -> None:
        if owner not in st.deps:
            st.deps.append(owner)

    for ref in st.inputs:
        if isinstance(ref, Choice):
            ref.names, ref.paths = [], []
            for cand in ref.best:
                got = match(cand)
                if not got:
                    raise RcompError(f"{w}: best: {cand!r} is not a stage name (a choice is made among stages' "
                                     "models, not files)")
                for m, path, owner in got:
                    if path not in ref.paths:
                        ref.names.append(m)
                        ref.paths.append(path)
                        depend(owner)
            if ref.by not in names:
                raise RcompError(f"{w}: by: {ref.by!r} is not a stage name; name the bench stage that measures "
                                 "the candidates")
            ref.by_output = str(out_dir / names[ref.by].output)
            depend(ref.by)
            st.choices.append((len(st.input_paths), ref))
            continue
        matches = match(ref)
        if not matches:
            if not Path(ref).is_file():
                raise RcompError(f"{w}: input {ref!r} is neither a stage name nor an existing file")
            st.input_paths.append(ref)
            st.file_inputs.append(ref)
        for _, path, owner in matches:
            if path not in st.input_paths:
                st.input_paths.append(path)
                depend(owner)
    st.fixed_paths = list(st.input_paths)


def _check_choices(recipe: Recipe, names: dict[str, Stage]) -> None:
    """Each run-time choice's ``by`` stage is a bench writing JSON that measures every candidate."""
    for st in recipe.stages:
        w = f"{recipe.source} line {st.line}" if st.line else recipe.source
        for _, ch in st.choices:
            by = names[ch.by]
            if by.command != "bench" or getattr(by.config, "format", None) != "json":
                raise RcompError(f"{w}: by: {ch.by!r} must be a bench stage with format: json (its figures "
                                 "choose the model)")
            missing = [n for n, p in zip(ch.names, ch.paths, strict=True) if p not in by.input_paths]
            if missing:
                raise RcompError(f"{w}: bench stage {ch.by!r} does not measure {missing[0]!r}; add it to its "
                                 "inputs or drop it from best:")


def _choose(st: Stage, log) -> list[str]:
    """``st``'s input paths with each run-time choice made (:func:`rcomp.recipes.choice.pick`), set on ``st``."""
    from rcomp.recipes.choice import pick

    if not st.choices:
        return st.input_paths
    paths, st.picked = list(st.fixed_paths), []
    for pos, ch in reversed(st.choices):  # from the back, so earlier positions stay valid
        chosen, record = pick(ch, f"stage {st.name} (line {st.line})", lambda msg: log(f"{st.name}: {msg}"))
        st.picked.insert(0, record)
        if chosen not in paths:
            paths.insert(pos, chosen)
    st.input_paths, st.chosen = paths, True
    return paths


def _order(recipe: Recipe, names: dict[str, Stage]) -> list[Stage]:
    """Topological order (stable), refusing cycles."""
    order, state = [], {}

    def visit(n, chain):
        if state.get(n) == "done":
            return
        if state.get(n) == "active":
            cyc = " -> ".join([*chain[chain.index(n):], n])
            raise RcompError(f"{recipe.source} line {names[n].line}: stages form a cycle: {cyc}")
        state[n] = "active"
        for d in names[n].deps:
            visit(d, [*chain, n])
        state[n] = "done"
        order.append(names[n])

    for st in recipe.stages:
        visit(st.name, [])
    return order


def command_line(st: Stage) -> str:
    """The equivalent ``rcomp`` command, quoted as a shell would (for logs and --dry-run)."""
    from rcomp.options import to_args
    from rcomp.text import shell_quote

    paths = list(st.input_paths)
    if not st.chosen:  # the choices show as what they choose among
        for pos, ch in reversed(st.choices):
            paths.insert(pos, ch.label())
    return shell_quote(["rcomp", st.command, *paths, *to_args(st.config)])


def _fingerprint(st: Stage) -> str:
    from rcomp.io.header import sha256_file
    from rcomp.options import config_dict

    h = hashlib.sha256(json.dumps([st.command, config_dict(st.config)], sort_keys=True, default=str).encode())
    for p in st.input_paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


#: a stamp is a few hundred bytes of JSON; a larger one is not rcomp's
STAMP_MAX_BYTES = 64 * 1024


def _read_stamp(stamp: Path) -> dict | None:
    """The stamp's JSON, or None when there is none or it is unreadable (the stage then runs again).
    Read as a bounded regular file: a FIFO or device planted there is refused, never waited on."""
    from rcomp.io.bounded import read_bounded

    if not os.path.lexists(stamp):
        return None
    try:
        prev = json.loads(read_bounded(stamp, STAMP_MAX_BYTES, "recipe stamp").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return prev if isinstance(prev, dict) else None


def _up_to_date(out: Path, stamp: Path, fp: str, log=None, extras: list[Path] = ()) -> dict | None:
    """The stamp when the stage need not run: same fingerprint, and the bytes of the output and of each
    extra file are those the stamp recorded (a file changed, damaged or missing since is made again, and
    the log says why)."""
    from rcomp.io.header import sha256_file

    prev = _read_stamp(stamp)
    if prev is None or prev.get("fingerprint") != fp or not out.exists():
        return None
    recorded = prev.get("extra_sha256") if extras else {}
    if not isinstance(recorded, dict):
        return None
    for path, want in [(out, prev.get("output_sha256")), *((p, recorded.get(p.name)) for p in extras)]:
        try:
            digest = sha256_file(path) if path.exists() else None
        except RcompError:
            digest = None
        if digest is None or digest != want:
            if log is not None:
                log(f"{path}: its content is not what its last run wrote (sha256 differs or it is missing); running "
                    "the stage again")
            return None
    return prev


def _check_out_dir(out_dir: Path) -> None:
    """Before anything is created: the output folder is (or can be made) a writable folder, and its stamp
    folder, if there, is a real folder holding only regular files (no symlink or FIFO planted there)."""
    import stat

    from rcomp.io.atomic import check_writable_folder

    shown = printable(str(out_dir), 80)
    probe = out_dir
    try:
        while not os.path.lexists(probe) and probe != probe.parent:
            probe = probe.parent
        if os.path.lexists(probe) and not probe.is_dir():
            what = "is" if probe == out_dir else f"lies below {printable(str(probe), 80)}, which is"
            raise RcompError(f"--out-dir {shown} {what} not a folder; choose another output folder")
        check_writable_folder(probe / "x")
        records = out_dir / RECORDS_DIR
        if os.path.lexists(records) and not stat.S_ISDIR(os.lstat(records).st_mode):
            raise RcompError(f"{printable(str(records), 120)} is not a folder (a symlink or other file was put "
                             "there); remove it and rerun")
        stamps = out_dir / STAMP_DIR
        if os.path.lexists(stamps):
            st = os.lstat(stamps)
            if not stat.S_ISDIR(st.st_mode):
                raise RcompError(f"{printable(str(stamps), 120)} is not a folder (a symlink or other file was put "
                                 "there); remove it and rerun")
            for entry in os.scandir(stamps):
                if not entry.is_file(follow_symlinks=False):
                    raise RcompError(f"recipe stamp {printable(entry.path, 120)} is not a regular file (a symlink, "
                                     "FIFO or folder was put there); remove it and rerun")
    except OSError as exc:
        raise RcompError(f"--out-dir {shown} cannot be used: {exc.strerror or exc}; choose another "
                         "output folder") from None


def _run_stage(st: Stage, log, **kw: Any) -> Any:
    """Run one stage; ``kw`` (under torchrun): ``dist`` (the process group the stage shares, or
    ``DistInfo()`` to run alone) and ``config`` (the config to run instead of the stage's own)."""
    from rcomp.stages import get_stage

    cfg = kw.pop("config", None) or st.config
    try:
        res = get_stage(st.command).run(cfg, [Path(p) for p in st.input_paths], log=log, **kw)
        res.raise_failures()
    except RcompError as exc:
        raise type(exc)(f"stage {st.name} (line {st.line}) failed: {exc}; fix it and rerun: finished stages "
                        "are skipped") from None
    return res


def run_recipe(recipe: Recipe, out_dir: Path, *, dry_run: bool = False, log=print,
               allow_factories: frozenset[str] = frozenset()) -> list[dict]:
    """Run the stages in order; returns one record per stage (name, status, seconds, output).

    Under torchrun (``torchrun --nproc-per-node N -m rcomp run recipe.yaml``) every process checks the
    recipe; the attack and bench stages are split over the processes (:func:`_shardable`), each
    writing its own per-example records, and rank 0 merges them; every other stage runs in rank 0
    alone while the others wait. Rank 0 alone writes outputs and stamps, and logs."""
    from rcomp.train import distributed as D

    out_dir = Path(out_dir)
    if D.launched() and not dry_run:
        return _run_sharded(recipe, out_dir, log, allow_factories)
    order = plan(recipe, out_dir, allow_factories)
    _check_out_dir(out_dir)
    if dry_run:
        return [{"stage": st.name, "status": "planned", "command": command_line(st)} for st in order]
    made = [p for p in (out_dir, out_dir / STAMP_DIR) if not os.path.lexists(p)]
    try:
        return _run_all(order, out_dir, log)
    except BaseException:
        for p in reversed(made):  # a run that failed before writing anything leaves no folder behind
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


#: how long a torchrun process of a recipe waits for the others (rank 0 may train for days meanwhile)
RECIPE_WAIT_S = 7 * 24 * 3600.0


def _run_sharded(recipe: Recipe, out_dir: Path, log, allow_factories: frozenset[str]) -> list[dict]:
    from rcomp.train import distributed as D

    dist, _ = D.setup("cpu", backend="gloo", timeout_s=RECIPE_WAIT_S)  # the stages pick their own devices
    try:
        own_log = log  # the stages this process runs alone log here
        if not dist.is_main:
            log = _silent
        error = None
        try:
            order = plan(recipe, out_dir, allow_factories)
            _check_out_dir(out_dir)
        except RcompError as exc:
            error = exc
        refusals = D.all_gather_json(None if error is None else [str(error), error.exit_code], dist)
        first = next((r for r, e in enumerate(refusals) if e is not None), None)
        if first is not None:  # every process refuses; the first that found a reason says it, once
            if first == dist.rank:
                raise error
            raise AlreadyReported(f"process {first} refused the recipe", exit_code=refusals[first][1])
        made = [p for p in (out_dir, out_dir / STAMP_DIR) if not os.path.lexists(p)]
        D.barrier(dist)  # every process has looked at the folder before rank 0 makes it
        try:
            return _run_levels(order, out_dir, log, own_log, dist)
        except BaseException:
            if dist.is_main:
                for p in reversed(made):
                    with contextlib.suppress(OSError):
                        p.rmdir()
            raise
    finally:
        D.teardown(dist)


def _silent(msg: str) -> None:
    """The log of a torchrun process other than rank 0."""


def _shardable(st: Stage) -> tuple[bool, str]:
    """Whether a stage's work can be split over torchrun processes, and if not, why (empty: not an
    evaluation). attack and bench are, unless they replay saved examples or :func:`shard_refusal` says no."""
    from rcomp.evaluation.cascade import expand_suites, wants_cascade
    from rcomp.evaluation.robustness import shard_refusal

    cfg = st.config
    if st.command not in ("attack", "bench"):
        return False, ""
    if getattr(cfg, "from_file", None) is not None:
        return False, "it replays saved examples (quick)"
    built = cfg.build(cfg.seed) if cfg.attack else {}
    why = shard_refusal(expand_suites(built), wants_cascade(built, cfg.cascade))
    return (False, why) if why else (True, "")


def _drop_records(out_dir: Path, name: str) -> None:
    """Remove the records folders the engine made for stage ``name`` (``NAME-<16 hex>``), and the records
    folder itself once empty; a stage's own ``records:`` folder is never touched."""
    import shutil

    root = out_dir / RECORDS_DIR
    if not root.is_dir() or root.is_symlink():
        return
    for p in root.iterdir():
        rest = p.name[len(name) + 1:] if p.name.startswith(f"{name}-") else ""
        if re.fullmatch(r"[0-9a-f]{16}", rest) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()  # only when no other stage's records are left there


def _run_all(order: list[Stage], out_dir: Path, log) -> list[dict]:
    """The stages one after the other in this process (no torchrun)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP_DIR).mkdir(exist_ok=True)
    records = []
    for i, st in enumerate(order, 1):
        out = out_dir / st.output
        _choose(st, log)
        base = {"stage": st.name, "output": str(out), "command": st.command,
                **({"choices": st.picked} if st.picked else {})}
        fp = _fingerprint(st)
        prev = _up_to_date(out, out_dir / STAMP_DIR / f"{st.name}.json", fp, log, [out_dir / rel for rel in st.extras])
        if prev is not None:
            log(f"[{i}/{len(order)}] {st.name}: up to date, skipped")
            records.append({**base, "status": "skipped", "seconds": prev.get("seconds", 0.0)})
            continue
        log(f"[{i}/{len(order)}] {st.name}: {command_line(st)}")
        t0 = time.perf_counter()
        res = _run_stage(st, log)
        seconds = time.perf_counter() - t0
        _write_stamp(st, out_dir, fp, seconds)
        _drop_records(out_dir, st.name)  # records an earlier torchrun run of this stage left
        records.append({**base, "status": "ran", "seconds": seconds,
                        **({"result": res.report} if st.command == "bench" else {})})
    return records


# ------------------------------------------------------------------------------------------
# several processes (torchrun, or rcomp run --workers N): stages in levels, taken as they become ready
# ------------------------------------------------------------------------------------------

def together(st: Stage) -> bool:
    """Whether a stage runs with every process of the group (attack and bench: split over them when
    they can be, :func:`_shardable`), not alone in one."""
    return st.command in ("attack", "bench")


def _levels(order: list[Stage]) -> list[tuple[list[Stage], list[Stage]]]:
    """The stages as ``(alone, together)`` per level, each in recipe order. A stage's level is the number of
    attack/bench stages (:func:`together`) on the longest chain of what it reads: the alone stages of a level
    read only stages of lower levels and alone stages of their own, the together ones nothing of their own
    level that is also together. A level's alone stages run first, each in one process as soon as what it
    reads is done (:func:`_run_claimed`); then its together stages, with every process."""
    level: dict[str, int] = {}
    names = {st.name: st for st in order}
    for st in order:  # topological: every dependency has its level already
        level[st.name] = max((level[d] + together(names[d]) for d in st.deps), default=0)
    top = max(level.values(), default=-1)
    return [([st for st in order if level[st.name] == k and not together(st)],
             [st for st in order if level[st.name] == k and together(st)]) for k in range(top + 1)]


#: the parameter count a fine-tuning cost assumes when its input does not exist yet (or has none recorded)
PARAMS_UNKNOWN = 100_000
#: how much more a pass of a quantized model's fake-quant twin costs than one of its float model (measured on
#: the demo's convnet8: 1.2-1.6x)
QUANTIZED_FACTOR = 1.4


def _input_size(st: Stage) -> tuple[float, bool]:
    """(parameters, quantized) of the model a stage reads, from its checkpoint's header; (PARAMS_UNKNOWN,
    False) while it does not exist yet or says nothing."""
    paths = st.input_paths or st.fixed_paths
    if not paths:
        return float(PARAMS_UNKNOWN), False
    try:
        from rcomp.io.format import CheckpointMeta
        from rcomp.io.header import read_header

        meta = CheckpointMeta.from_metadata(read_header(Path(paths[0])).metadata, paths[0])
        params = meta.stats.get("params")
        return (float(params) if isinstance(params, (int, float)) and params > 0 else float(PARAMS_UNKNOWN),
                bool(meta.compression.get("quantization")))
    except (RcompError, OSError, ValueError, AttributeError, TypeError):
        return float(PARAMS_UNKNOWN), False


def expected_cost(st: Stage) -> float:
    """A rough relative cost of running a stage alone, to order and balance the processes: a fine-tuning
    run's passes (with its overfitting guard's checks) times its batch times the parameters of the model it
    reads (:func:`_input_size`; :data:`QUANTIZED_FACTOR` more for a quantized one); 1 for the rest."""
    cfg = st.config
    if st.command != "finetune" or cfg is None:
        return 1.0
    try:
        from rcomp.train.budget import DEFAULT_TRAIN_SIZE, passes_per_step
        from rcomp.train.catalog import SINGLE_STEP
        from rcomp.train.guards import CO_BATCH, CO_STEPS

        batch = int(cfg.batch_size)
        per_epoch = math.ceil(DEFAULT_TRAIN_SIZE / batch)
        steps = cfg.steps_budget or cfg.epochs * per_epoch
        passes = steps * batch * passes_per_step(cfg.adv, cfg.steps, getattr(cfg, "grad_align", 0.0) or 0.0)
        if cfg.adv in SINGLE_STEP:  # the guard: PGD and the training adversary on a batch after every epoch
            passes += math.ceil(steps / per_epoch) * CO_BATCH * (CO_STEPS + 4)
        params, quantized = _input_size(st)
        return float(passes) * params * (QUANTIZED_FACTOR if quantized else 1.0)
    except (AttributeError, TypeError, ValueError, RcompError):
        return 100.0 * PARAMS_UNKNOWN


def _priorities(stages: list[Stage], known: dict[str, float] | None = None) -> dict[str, float]:
    """Each stage's expected cost plus the longest chain of costs after it among ``stages`` (its critical
    path): the order in which the processes take ready stages, so the longest chain starts first. ``known``:
    costs already final (their inputs were written), kept across calls; filled here."""
    names = {st.name for st in stages}
    after: dict[str, list[str]] = {st.name: [] for st in stages}
    for st in stages:
        for d in st.deps:
            if d in names:
                after[d].append(st.name)
    known = {} if known is None else known
    cost = {}
    for st in stages:
        if st.name not in known:
            value = expected_cost(st)
            if not any(d in names for d in st.deps) or all(Path(p).exists() for p in st.input_paths):
                known[st.name] = value  # its input exists (or it reads none of this level): final
            cost[st.name] = value
        else:
            cost[st.name] = known[st.name]
    prio: dict[str, float] = {}
    for st in reversed(stages):  # recipe order is topological: successors come later
        prio[st.name] = cost[st.name] + max((prio[n] for n in after[st.name]), default=0.0)
    return prio


def assign(stages: list[Stage], world: int) -> dict[str, int]:
    """Which process runs each of ``stages`` (independent, each run by one process): the longest expected
    first, each to the process with the least expected work so far (ties: the lowest rank). A bench stage
    runs in rank 0, which reports its figures. Deterministic."""
    load = [0.0] * world
    owner: dict[str, int] = {}
    pinned = [st for st in stages if st.command == "bench"]
    for st in pinned:
        owner[st.name] = 0
        load[0] += expected_cost(st)
    rest = sorted((st for st in stages if st.command != "bench"), key=lambda st: -expected_cost(st))
    for st in rest:  # sorted() is stable: equal costs keep recipe order
        r = min(range(world), key=lambda k: (load[k], k))
        owner[st.name] = r
        load[r] += expected_cost(st)
    return owner


class _Prefixed:
    """A text stream that starts every line (after a newline or a carriage return) with ``prefix``: the
    stderr of a process while stages run side by side, so each line names its stage."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in re.split(r"([\r\n])", text):
            if piece in ("\r", "\n"):
                self.start = True
            elif piece and self.start:
                out.append(self.prefix)
                self.start = False
            out.append(piece)
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _write_stamp(st: Stage, out_dir: Path, fp: str, seconds: float) -> None:
    from rcomp.io.atomic import atomic_write_text
    from rcomp.io.header import sha256_file

    out = out_dir / st.output
    extra = {Path(rel).name: sha256_file(out_dir / rel) for rel in st.extras if (out_dir / rel).exists()}
    atomic_write_text(out_dir / STAMP_DIR / f"{st.name}.json",
                      json.dumps({"fingerprint": fp, "seconds": seconds,
                                  "output_sha256": sha256_file(out) if out.exists() else None,
                                  **({"extra_sha256": extra} if st.extras else {})}))


#: how often a process with nothing ready looks again (seconds)
POLL_S = 0.1


def _run_levels(order: list[Stage], out_dir: Path, log, own_log, dist) -> list[dict]:
    """The stages over the processes of ``dist``, level by level (:func:`_levels`): first the level's alone
    stages, each taken by the first process free when what it reads is done (:func:`_run_claimed`), then its
    attack and bench stages with every process (:func:`_run_together`). Every stage runs with the config,
    seed and inputs of a one-process run, so its files are those of one. A failure stops the run once the
    level's running stages end, said once (by the process of the first failing stage in recipe order).
    Returns rank 0's records, in recipe order."""
    from rcomp.train import distributed as D

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / STAMP_DIR).mkdir(exist_ok=True)
    D.barrier(dist)  # the folders exist before any process runs a stage that writes there
    number = {st.name: i for i, st in enumerate(order, 1)}
    done: dict[str, dict] = {}
    for alone, together_ in _levels(order):
        if alone:
            _run_claimed(alone, out_dir, own_log, dist, number, len(order), done)
        if together_:
            _run_together(together_, out_dir, log, own_log, dist, number, len(order), done)
    return [{"stage": st.name, "output": str(out_dir / st.output), "command": st.command,
             **({"choices": st.picked} if st.picked else {}), **done[st.name]} for st in order]


def _run_one(st: Stage, out_dir: Path, own_log, number: int, total: int, side: bool) -> tuple[str, float]:
    """Run (or skip, when up to date) one stage in this process alone: ``(status, seconds)``."""
    from rcomp.train import distributed as D

    _choose(st, own_log)
    fp = _fingerprint(st)
    prev = _up_to_date(out_dir / st.output, out_dir / STAMP_DIR / f"{st.name}.json", fp, own_log,
                       [out_dir / rel for rel in st.extras])
    if prev is not None:
        own_log(f"[{number}/{total}] {st.name}: up to date, skipped")
        return "skipped", float(prev.get("seconds", 0.0))
    own_log(f"[{number}/{total}] {st.name}: {command_line(st)}")
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(_Prefixed(sys.stderr, f"[{st.name}] ")) if side else contextlib.nullcontext():
        _run_stage(st, own_log, dist=D.DistInfo())
    seconds = time.perf_counter() - t0
    _write_stamp(st, out_dir, fp, seconds)
    _drop_records(out_dir, st.name)
    return "ran", seconds


def _exchange(report: dict, dist) -> list[dict]:
    """Every process's ``report`` (what it ran and whether a stage failed), in rank order; a process that
    failed and left the group has said why, so the others stop without a word."""
    from rcomp.train import distributed as D

    try:
        return D.all_gather_json(report, dist)
    except Exception:
        if D.another_failed():  # a process that failed left the group: it said why
            raise AlreadyReported("another process failed", exit_code=1) from None
        raise


def _raise_first_failure(reports: list[dict], dist, error: RcompError | None) -> None:
    """After :func:`_exchange`: the first failing stage in recipe order is said by its process (``error``
    there), the others stop with its exit code without a word."""
    fails = sorted((rep["failed"], r) for r, rep in enumerate(reports) if rep["failed"] is not None)
    if fails:
        (_, _, code), r = fails[0]
        if r == dist.rank and error is not None:
            raise error
        raise AlreadyReported(f"a stage failed in process {r}", exit_code=code)


def _run_claimed(alone: list[Stage], out_dir: Path, own_log, dist, number: dict[str, int], total: int,
                 done: dict[str, dict]) -> None:
    """Run a level's alone stages over the processes: each process takes, whenever it is free, the ready
    stage (all it reads done) with the longest expected chain after it (:func:`_priorities`), claimed in the
    group's store so that exactly one process runs it; with nothing ready it waits for the stages the others
    run. After a failure no process takes another stage. Then the processes exchange what ran, was skipped,
    chose or failed; rank 0 records it in ``done``."""
    from rcomp.train import distributed as D

    names = {st.name for st in alone}
    prio: dict[str, float] = {}
    final: dict[str, float] = {}  # costs read from inputs that exist (they do not change)
    known = -1  # how many stages were known done when prio was computed (costs read the inputs' headers)
    side = dist.world > 1 and len(alone) > 1  # stages may run side by side: their lines carry their names
    taken: set[str] = set()  # by this process or another
    finished: set[str] = set()  # known to be done
    mine: dict[str, dict] = {}
    failed = error = None

    def is_done(name: str) -> bool:
        if name not in names or name in finished:
            return True
        if D.marked(f"done/{name}", dist):
            finished.add(name)
            return True
        return False

    while not (D.marked("stage-failed", dist) or D.another_failed()):
        ready = [st for st in alone if st.name not in taken and all(is_done(d) for d in st.deps)]
        if ready and known != len(finished):
            prio, known = _priorities(alone, final), len(finished)
        ready.sort(key=lambda st: (-prio[st.name], number[st.name]))
        got = None
        for st in ready:
            taken.add(st.name)
            if D.claim(f"stage/{st.name}", dist):
                got = st
                break
        if got is None:
            if len(taken) == len(alone):
                break  # every stage is run (or was) by some process
            time.sleep(POLL_S)
            continue
        try:
            status, seconds = _run_one(got, out_dir, own_log, number[got.name], total, side)
        except RcompError as exc:
            failed, error = [number[got.name], str(exc), exc.exit_code], exc
            D.mark("stage-failed", dist)
            break
        except Exception:  # an internal error: this process says it and stops; the others stop silently
            D.first_to_fail()
            raise
        mine[got.name] = {"status": status, "seconds": seconds, "picked": got.picked}
        finished.add(got.name)
        D.mark(f"done/{got.name}", dist)
    reports = _exchange({"done": mine, "failed": failed}, dist)
    stages = {st.name: st for st in alone}
    for rep in reports:
        for name, rec in rep["done"].items():
            if rec["picked"]:
                stages[name].picked = rec["picked"]
            done[name] = {"status": rec["status"], "seconds": rec["seconds"]}
    _raise_first_failure(reports, dist, error)


def _run_together(wave: list[Stage], out_dir: Path, log, own_log, dist, number: dict[str, int], total: int,
                  done: dict[str, dict]) -> None:
    """A level's attack and bench stages: rank 0 decides for each (up to date, split over the processes or
    not) and tells the others; those that cannot be split run alone (:func:`assign`: bench in rank 0), then
    those that can run one after the other over every process, rank 0 merging their records."""
    from rcomp.train import distributed as D

    main = dist.is_main
    plans = None
    refused = None
    if main:  # rank 0 alone reads stamps and outputs, and says what every process does
        plans = {}
        try:
            for st in wave:
                _choose(st, log)
                fp = _fingerprint(st)
                prev = _up_to_date(out_dir / st.output, out_dir / STAMP_DIR / f"{st.name}.json", fp, log,
                                   [out_dir / rel for rel in st.extras])
                shard, why = _shardable(st) if prev is None else (False, "")
                plans[st.name] = {"skip": prev is not None, "seconds": (prev or {}).get("seconds", 0.0),
                                  "shard": shard, "fp": fp, "why": why, "inputs": st.input_paths}
        except RcompError as exc:  # e.g. a run-time choice that cannot be made: every process stops
            refused, plans = exc, {"!refused": [str(exc), exc.exit_code]}  # no stage is named so
    plans = D.broadcast(plans, dist)
    if "!refused" in plans:
        if refused is not None:
            raise refused
        raise AlreadyReported("rank 0 stopped the run", exit_code=plans["!refused"][1])
    for st in wave:  # every process runs a stage on the inputs rank 0 chose
        st.input_paths, st.chosen = list(plans[st.name]["inputs"]), True
    for st in wave:
        if plans[st.name]["skip"]:
            log(f"[{number[st.name]}/{total}] {st.name}: up to date, skipped")
            done[st.name] = {"status": "skipped", "seconds": plans[st.name]["seconds"]}
    alone = [st for st in wave if not plans[st.name]["skip"] and not plans[st.name]["shard"]]
    owner = assign(alone, dist.world)
    side = len(alone) > 1  # stages run side by side: their lines carry their names
    ran: dict[str, float] = {}
    failed = error = None
    for st in (st for st in alone if owner[st.name] == dist.rank):
        own_log(f"[{number[st.name]}/{total}] {st.name}: {command_line(st)}")
        if plans[st.name]["why"]:
            own_log(f"{st.name}: runs in rank {dist.rank} alone: {plans[st.name]['why']}")
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stderr(_Prefixed(sys.stderr, f"[{st.name}] ")) if side else \
                    contextlib.nullcontext():
                res = _run_stage(st, own_log, dist=D.DistInfo())
        except RcompError as exc:
            failed, error = [number[st.name], str(exc), exc.exit_code], exc
            break  # this process's other stages of the level do not start
        except Exception:  # an internal error: this process says it and stops; the others stop silently
            D.first_to_fail()
            raise
        seconds = time.perf_counter() - t0
        _write_stamp(st, out_dir, plans[st.name]["fp"], seconds)
        _drop_records(out_dir, st.name)
        ran[st.name] = seconds
        done[st.name] = {"status": "ran", "seconds": seconds,
                         **({"result": res.report} if st.command == "bench" and main else {})}
    reports = _exchange({"ran": ran, "failed": failed}, dist)
    for rep in reports:
        for name, seconds in rep["ran"].items():
            done.setdefault(name, {"status": "ran", "seconds": seconds})
    _raise_first_failure(reports, dist, error)
    for st in (st for st in wave if plans[st.name]["shard"]):
        log(f"[{number[st.name]}/{total}] {st.name}: {command_line(st)}")
        log(f"{st.name}: split over {dist.world} processes")
        cfg = st.config
        if cfg.records is None:  # the processes hand their records to rank 0 through this folder
            folder = out_dir / RECORDS_DIR / f"{st.name}-{plans[st.name]['fp'][:16]}"
            cfg = dataclasses.replace(cfg, records=folder, resume=True)
        t0 = time.perf_counter()
        try:
            res = _run_stage(st, log, dist=dist, config=cfg)
            seconds = time.perf_counter() - t0
            D.barrier(dist)  # every process is done with the stage (and its records)
        except RcompError as exc:  # said by the first process to fail, once
            if D.first_to_fail():
                raise
            raise AlreadyReported(str(exc), exit_code=exc.exit_code) from None
        except Exception:
            if D.another_failed():  # a process that failed left the group: it said why
                raise AlreadyReported("another process failed", exit_code=1) from None
            raise
        if main:
            _write_stamp(st, out_dir, plans[st.name]["fp"], seconds)
            _drop_records(out_dir, st.name)  # this stage's records made for the processes (this run's or older)
        done[st.name] = {"status": "ran", "seconds": seconds,
                         **({"result": res.report} if st.command == "bench" and main else {})}
