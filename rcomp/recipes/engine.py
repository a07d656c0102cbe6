"""Run a YAML recipe: stages are CLI commands with named inputs and outputs, optionally swept over a grid.

A recipe::

    name: my-sweep
    vars: {eps: 0.1}                     # usable as {eps} in any string; --set eps=0.05 overrides
    defaults: {data: digits, seed: 0}    # options given to every stage whose command takes them
    stages:
      - name: base                       # unique; {var} templates allowed when the stage has a grid
        command: finetune                # any rcomp command
        options: {arch: convnet8, epochs: 10}
      - name: pruned-{ratio}
        command: prune
        input: base                      # a stage name (its output) or a file path
        grid: {ratio: [0.3, 0.5]}        # one stage per combination
        options: {ratio: "{ratio}"}
      - name: report
        command: bench
        inputs: [base, "pruned-*"]       # several inputs; * matches stage names
        options: {attack: "fgsm,pgd", eps: "{eps}", format: json}
        output: bench.json               # default: <name>.safetensors in the output folder

Everything is checked before any stage runs (unknown command or option, missing input, cycle,
duplicate names), naming the recipe line. A stage whose output exists and whose command, options and
inputs (by sha256) are unchanged since it last ran is skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rcomp.errors import RcompError

STAMP_DIR = ".rcomp-run"
_VAR_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Stage:
    name: str
    command: str
    options: dict[str, Any]
    inputs: list[str]
    output: str
    line: int
    wild: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    deps: list[str] = field(default_factory=list)
    input_paths: list[str] = field(default_factory=list)


def _line_map(text: str) -> dict[tuple, int]:
    """Line numbers (1-based) of recipe nodes: ('stages', i) and ('stages', i, key)."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
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
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class Recipe:
    def __init__(self, text: str, source: str = "recipe", overrides: dict[str, str] | None = None):
        self.source = source
        self._stage_overrides: dict[str, dict[str, Any]] = {}
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise RcompError(f"{source}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list) or not doc["stages"]:
            raise RcompError(f"{source}: a recipe is a mapping with a non-empty 'stages:' list")
        unknown = set(doc) - {"name", "description", "vars", "defaults", "stages", "out_dir"}
        if unknown:
            raise RcompError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}")
        self.lines = _line_map(text)
        self.name = str(doc.get("name", Path(source).stem))
        self.description = doc.get("description", "")
        self.vars = dict(doc.get("vars") or {})
        self.defaults = dict(doc.get("defaults") or {})
        self.out_dir = doc.get("out_dir")
        for key, val in (overrides or {}).items():
            if "." in key:
                stage_name, opt = key.split(".", 1)
                self._stage_overrides.setdefault(stage_name, {})[opt] = _coerce(val)
            else:
                self.vars[key] = _coerce(val)
        self.defaults = _subst(self.defaults, self.vars, f"{source} defaults")
        self.stages = self._expand(doc["stages"])

    def where(self, *key) -> str:
        line = self.lines.get(tuple(key)) or self.lines.get(tuple(key[:2]))
        return f"{self.source} line {line}" if line else self.source

    def _expand(self, raw_stages: list) -> list[Stage]:
        stages: list[Stage] = []
        for i, raw in enumerate(raw_stages):
            w = self.where("stages", i)
            if not isinstance(raw, dict):
                raise RcompError(f"{w}: a stage is a mapping with name, command and options")
            bad = set(raw) - {"name", "command", "options", "input", "inputs", "output", "grid"}
            if bad:
                raise RcompError(f"{self.where('stages', i, sorted(bad)[0])}: unknown stage key {sorted(bad)[0]!r}")
            if "name" not in raw or "command" not in raw:
                raise RcompError(f"{w}: a stage needs a name and a command")
            grid = _subst(raw.get("grid") or {}, self.vars, w)
            if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
                raise RcompError(f"{self.where('stages', i, 'grid')}: grid maps variable names to non-empty lists")
            keys = list(grid)
            for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
                env = {**self.vars, **dict(zip(keys, combo, strict=True))}
                name = str(_subst(raw["name"], env, w))
                options = _subst({**dict(raw.get("options") or {})}, env, w)
                if not isinstance(options, dict):
                    raise RcompError(f"{self.where('stages', i, 'options')}: options must be a mapping")
                wild = {}
                for pattern, ov in self._stage_overrides.items():
                    if pattern == name:
                        options.update(ov)
                    elif fnmatch.fnmatchcase(name, pattern):
                        wild.update(ov)  # applied only where the command takes the option
                ins = raw.get("inputs", [raw["input"]] if raw.get("input") is not None else [])
                if not isinstance(ins, list):
                    ins = [ins]
                ins = [str(_subst(x, env, w)) for x in ins]
                out = str(_subst(raw.get("output", f"{name}.safetensors"), env, w))
                stages.append(Stage(name=name, command=str(raw["command"]), options=options, wild=wild, inputs=ins,
                                    output=out, line=self.lines.get(("stages", i), 0), index=i))
        return stages


def load_recipe(path: Path, overrides: dict[str, str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RcompError(f"recipe {path} does not exist; check the path")
    return Recipe(path.read_text(), source=str(path), overrides=overrides)


# ------------------------------------------------------------------------------------------
# validation against the CLI's own commands and options
# ------------------------------------------------------------------------------------------

def _cli_commands():
    import typer.main

    from rcomp.cli import app

    group = typer.main.get_command(app)
    return {name: cmd for name, cmd in group.commands.items() if name not in ("run", "demo")}


def _option_index(cmd) -> dict[str, Any]:
    """option name (dashes) -> click parameter."""
    idx = {}
    for p in cmd.params:
        if getattr(p, "param_type_name", "") != "option":
            continue
        for opt in list(p.opts) + list(getattr(p, "secondary_opts", [])):
            if opt.startswith("--"):
                idx[opt[2:]] = p
        idx[p.name.replace("_", "-")] = p
    return idx


def plan(recipe: Recipe, out_dir: Path) -> list[Stage]:
    """Check the whole recipe and order its stages; raises RcompError naming the line."""
    commands = _cli_commands()
    names = {}
    for st in recipe.stages:
        w = f"{recipe.source} line {st.line}" if st.line else recipe.source
        if st.name in names:
            raise RcompError(f"{w}: stage name {st.name!r} is used twice")
        names[st.name] = st
        if st.command not in commands:
            raise RcompError(f"{w}: unknown command {st.command!r}; choose one of {', '.join(sorted(commands))}")
        idx = _option_index(commands[st.command])
        st.options.update({k: v for k, v in st.wild.items() if str(k).replace("_", "-") in idx})
        for key in list(recipe.defaults) + list(st.options):
            if key in st.options and str(key).replace("_", "-") not in idx:
                line = recipe.lines.get(("stages", st.index, "options", key))
                wk = f"{recipe.source} line {line}" if line else w
                raise RcompError(f"{wk}: command {st.command} has no option --{str(key).replace('_', '-')}")
        for key in ("output", "force"):
            if key in st.options:
                raise RcompError(f"{w}: set the output with the stage's output: key, not options.{key}")
    for st in recipe.stages:
        w = f"{recipe.source} line {st.line}" if st.line else recipe.source
        st.deps, st.input_paths = [], []
        for ref in st.inputs:
            matches = [n for n in names if fnmatch.fnmatchcase(n, ref)] if any(c in ref for c in "*?[") else \
                ([ref] if ref in names else [])
            if matches:
                for m in matches:
                    if m in st.deps:
                        continue
                    if m == st.name:
                        raise RcompError(f"{w}: stage {st.name!r} takes its own output as input")
                    st.deps.append(m)
                    st.input_paths.append(str(out_dir / names[m].output))
            else:
                p = Path(ref)
                if not p.exists():
                    raise RcompError(f"{w}: input {ref!r} is neither a stage name nor an existing file")
                st.input_paths.append(str(p))
    # topological order (stable), refusing cycles
    order, state = [], {}

    def visit(n, chain):
        if state.get(n) == "done":
            return
        if state.get(n) == "active":
            cyc = " -> ".join([*chain[chain.index(n):], n])
            st = names[n]
            raise RcompError(f"{recipe.source} line {st.line}: stages form a cycle: {cyc}")
        state[n] = "active"
        for d in names[n].deps:
            visit(d, [*chain, n])
        state[n] = "done"
        order.append(names[n])

    for st in recipe.stages:
        visit(st.name, [])
    return order


def _args_for(stage: Stage, defaults: dict[str, Any], out_path: Path) -> list[str]:
    cmd = _cli_commands()[stage.command]
    idx = _option_index(cmd)
    opts = {k: v for k, v in defaults.items() if str(k).replace("_", "-") in idx}
    opts.update(stage.options)
    args = [stage.command, *stage.input_paths]
    for key, val in opts.items():
        name = str(key).replace("_", "-")
        p = idx[name]
        if getattr(p, "is_flag", False):
            if isinstance(val, str):
                val = val.strip().lower() in ("1", "true", "yes", "on")
            if val:
                args.append(f"--{name}")
            elif p.secondary_opts:
                args.append(p.secondary_opts[0])
            continue
        if isinstance(val, list):
            val = ",".join(str(v) for v in val)
        args += [f"--{name}", str(val)]
    args += ["-o", str(out_path), "--force"]
    return args


def _fingerprint(stage: Stage, args: list[str]) -> str:
    from rcomp.io.header import sha256_file

    h = hashlib.sha256(json.dumps(args).encode())
    for p in stage.input_paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def run_recipe(recipe: Recipe, out_dir: Path, *, dry_run: bool = False, log=print) -> list[dict]:
    """Run the stages in order; returns one record per stage (name, status, seconds, output)."""
    from rcomp.cli import main

    out_dir = Path(out_dir)
    order = plan(recipe, out_dir)
    if dry_run:
        return [{"stage": st.name, "status": "planned",
                 "args": _args_for(st, recipe.defaults, out_dir / st.output)} for st in order]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP_DIR).mkdir(exist_ok=True)
    records = []
    for i, st in enumerate(order, 1):
        out = out_dir / st.output
        args = _args_for(st, recipe.defaults, out)
        stamp = out_dir / STAMP_DIR / f"{st.name}.json"
        fp = _fingerprint(st, args)
        if out.exists() and stamp.exists():
            try:
                prev = json.loads(stamp.read_text())
            except json.JSONDecodeError:
                prev = {}
            if prev.get("fingerprint") == fp:
                log(f"[{i}/{len(order)}] {st.name}: up to date, skipped")
                records.append({"stage": st.name, "status": "skipped", "seconds": prev.get("seconds", 0.0),
                                "output": str(out), "command": st.command})
                continue
        log(f"[{i}/{len(order)}] {st.name}: rcomp {' '.join(args)}")
        t0 = time.perf_counter()
        code = 0
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stage output paths are logs here
                main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        seconds = time.perf_counter() - t0
        if code != 0:
            raise RcompError(f"stage {st.name} (line {st.line}) failed with exit code {code}; "
                             "fix it and rerun: finished stages are skipped")
        from rcomp.io.atomic import atomic_write_text

        atomic_write_text(stamp, json.dumps({"fingerprint": fp, "seconds": seconds, "args": args}))
        records.append({"stage": st.name, "status": "ran", "seconds": seconds, "output": str(out),
                        "command": st.command})
        sys.stdout.flush()
    return records
