"""Commands built from option declarations: one Typer command per config dataclass.

Each declared option becomes a command-line option whose value arrives as text (or None when not
given); :func:`rcomp.options.make_config` then validates it, merged with ``--config``, before torch
is imported. Nothing here knows a stage's options by name.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional  # noqa: UP035 - typer reads these annotations at run time

import typer

from rcomp.catalog import Choices
from rcomp.errors import RcompError
from rcomp.options import Option, make_config, option_index, options_of
from rcomp.text import printable

#: command name -> config class of every command that takes --config (filled by make_command)
CONFIG_COMMANDS: dict[str, type] = {}

#: how a command takes its inputs: "one" checkpoint (or a path on stdin), "many", "source" (required
#: file), "optional" (a checkpoint, or none), "recipe" (required file), None (no positional input)
INPUT_HELP = {
    "one": "Input checkpoint (.safetensors); read from stdin when omitted and stdin is a pipe.",
    "optional": "Input checkpoint to fine-tune; omit it (with --arch) to train from scratch.",
    "many": "Checkpoints to compare (one row each); read from stdin (one path a line) when omitted and stdin is a pipe.",
    "source": "A .safetensors file of plain weights, or a .pt/.pth state_dict.",
    "recipe": "Recipe file (.yaml).",
}

CONFIG_HELP = ("YAML file of defaults for this command's options (keys are option names as typed on the command "
               "line, e.g. data-dir or attack; optionally nested under the command name).")


def help_text(summary: str, doc: str = "", examples: str = "") -> str:
    """Summary, description and verbatim examples (``\\b`` keeps click from re-flowing them)."""
    parts = [summary]
    if doc:
        parts.append(doc)
    if examples:
        lines = "\n".join("  " + ln for ln in examples.strip("\n").splitlines())
        parts.append(f"Examples:\n\n\b\n{lines}")
    return "\n\n".join(parts)


def _param(o: Option) -> inspect.Parameter:
    if o.kind == "bool":
        decl = f"{o.flag}/{o.secondary}" if o.secondary else o.flag
        flags = [decl, *[f for f in o.flags if f != o.flag]]
        info = typer.Option(None, *flags, help=o.help_text(), show_default=False)
        ann: Any = Optional[bool]  # noqa: UP045
    elif o.kind == "repeat":
        info = typer.Option(None, *o.flags, help=o.help_text(), show_default=False, metavar=o.metavar or "TEXT")
        ann = Optional[list[str]]  # noqa: UP045
    else:
        info = typer.Option(None, *o.flags, help=o.help_text(), show_default=False, metavar=o.metavar or _metavar(o))
        ann = Optional[str]  # noqa: UP045
    return inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=ann)


def _metavar(o: Option) -> str:
    if o.kind == "choice":  # a catalogue's choices show its built-ins: plugins are not looked up for help
        names = o.choices.catalogue.builtin_names() if isinstance(o.choices, Choices) else o.choices
        return "[" + "|".join(names) + ("|..." if isinstance(o.choices, Choices) and o.choices.catalogue.group else "") + "]"
    return {"int": "INTEGER", "float": "FLOAT", "number": "NUMBER", "eps": "EPS", "eps_list": "EPS[,EPS]",
            "fraction": "FRACTION", "path": "PATH", "shape": "C,H,W", "floats": "X[,X]", "ints": "N[,N]", "json": "JSON",
            "names": "NAME[,NAME]"}.get(o.kind, "TEXT")


METAVARS = {"one": "CKPT", "optional": "CKPT", "many": "CKPT...", "source": "SRC", "recipe": "RECIPE"}


def _input_param(inputs: str) -> inspect.Parameter:
    if inputs == "many":
        info = typer.Argument(None, help=INPUT_HELP[inputs], show_default=False, metavar=METAVARS[inputs])
        ann: Any = Optional[list[Path]]  # noqa: UP045
    else:
        required = inputs in ("source", "recipe")
        info = typer.Argument(... if required else None, help=INPUT_HELP[inputs], show_default=False,
                              metavar=METAVARS[inputs])
        ann = Path if required else Optional[Path]  # noqa: UP045
    return inspect.Parameter("inputs", inspect.Parameter.KEYWORD_ONLY, default=info, annotation=ann)


def make_command(app: typer.Typer, name: str, config_cls: type, inputs: str | None,
                 handler: Callable[[Any, list[Path]], None], help: str, with_config: bool = True,
                 resolve: Callable[[Any, Any], list[Path]] | None = None) -> None:
    """Register ``rcomp NAME``: parse -> config (validated, with ``--config``) -> ``handler(cfg, inputs)``."""
    params = [_param(o) for o in options_of(config_cls)]
    if inputs is not None:
        params.insert(0, _input_param(inputs))
    if with_config:
        CONFIG_COMMANDS[name] = config_cls
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],  # noqa: UP045
                                        default=typer.Option(None, "--config", help=CONFIG_HELP, show_default=False)))

    def command(**kw: Any) -> None:
        given_inputs = kw.pop("inputs", None)
        config_file = kw.pop("config", None)
        given = {k: v for k, v in kw.items() if v is not None}
        from_file = load_config_file(config_file, name, config_cls) if config_file else None
        cfg = make_config(config_cls, given, from_file=from_file, file_source=str(config_file or ""), command=name)
        handler(cfg, resolve(cfg, given_inputs) if resolve else resolve_inputs(inputs, given_inputs, cfg))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = name.replace("-", "_")
    command.__doc__ = help
    app.command(name, help=help, no_args_is_help=False)(command)


def _key(k: Any) -> str:
    return str(k).strip().lstrip("-").replace("_", "-").lower()


def load_config_file(path: Path, command: str, config_cls: type | None = None) -> dict[str, Any]:
    """A ``--config`` file's values for ``command``: top-level option names (each applied to the commands
    that take it, as recipe ``defaults`` are), merged with the command's own section (``prune: {ratio:
    0.5}``), which wins key by key. Other commands' sections are skipped; a top-level key that no
    command takes is refused, and so is any key of the command's own section it does not take."""
    from rcomp.safeyaml import load_yaml_file

    doc = load_yaml_file(Path(path), what="config file") or {}
    if not isinstance(doc, dict):
        raise RcompError(f"config file {path} must map option names to values")
    commands = {**CONFIG_COMMANDS, command: config_cls} if config_cls is not None else dict(CONFIG_COMMANDS)
    sections = {k for k, v in doc.items() if isinstance(v, dict) and k in commands}
    own = doc.get(command) if command in sections else {}
    if config_cls is None:
        return {**{k: v for k, v in doc.items() if k not in sections}, **own}
    takes = option_index(config_cls)
    known = set().union(*(option_index(c) for c in commands.values() if c is not None))
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if k in sections:
            continue
        if _key(k) in takes:
            out[k] = v
        elif _key(k) not in known:
            raise RcompError(f"{path}: command {command} has no option --{_key(k)}, nor does any other command "
                             f"(top-level key {k!r}); see rcomp {command} --help")
    out = {k: v for k, v in out.items() if _key(k) not in {_key(j) for j in own}}
    return {**out, **own}


def resolve_inputs(inputs: str | None, given: Any, cfg: Any) -> list[Path]:
    """The positional inputs, with the upstream command's output path read from stdin when omitted."""
    if inputs is None:
        return []
    if inputs == "many":
        if given:
            return [checkpoint_path(p) for p in given]
        if sys.stdin is None or sys.stdin.isatty():
            return [checkpoint_path(None)]  # says: no input given
        lines = piped_paths()
        files = [p for p in lines if _is_file(p)]
        if not files:  # says what the last line is not (or that stdin was empty)
            return [checkpoint_path(lines[-1] if lines else None)]
        if len(files) < len(lines):
            skipped = [printable(str(p), 60) for p in lines if not _is_file(p)]
            print(f"stdin: {len(files)} paths read; {len(skipped)} line(s) that name no file skipped "
                  f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})", file=sys.stderr)
        return [checkpoint_path(p) for p in files]
    if inputs in ("source", "recipe"):
        return [Path(given)]
    if inputs == "optional" and given is None:
        if getattr(cfg, "arch", None) is None:
            return [checkpoint_path(None)]
        piped = piped_path()
        return [checkpoint_path(piped)] if piped is not None else []
    return [checkpoint_path(given)]


def piped_paths() -> list[Path]:
    """The paths on stdin, one a line (what upstream rcomp commands print); none when stdin is a terminal."""
    if sys.stdin is None or sys.stdin.isatty():
        return []
    from rcomp.io.bounded import read_stdin_lines

    return [Path(ln.strip()) for ln in read_stdin_lines() if ln.strip()]


def _is_file(p: Path) -> bool:
    """Whether a line read from stdin names a file (a name too long or holding a NUL byte names none)."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def piped_path() -> Path | None:
    """The path an upstream rcomp command printed last on stdin (lines before it may be log lines), or None
    when stdin is a terminal or empty. Several lines naming files are refused: a command of one input took
    the last of them silently."""
    lines = piped_paths()
    files = [p for p in lines if _is_file(p)]
    if len(files) > 1:
        shown = ", ".join(printable(str(p), 60) for p in files[:3]) + (", ..." if len(files) > 3 else "")
        raise RcompError(f"stdin names {len(files)} files ({shown}) but this command takes one input; give it as "
                         "an argument (rcomp bench compares several)")
    return lines[-1] if lines else None


def checkpoint_path(path: Path | None) -> Path:
    """The input checkpoint: the argument, or the last path printed by an upstream command on stdin."""
    if path is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise RcompError("no input checkpoint given; pass CKPT or pipe a path from another rcomp command")
        path = piped_path()
        if path is None:
            raise RcompError("no input checkpoint given: stdin was empty (did the upstream command fail?)")
    path = Path(path)
    if not path.exists():
        raise RcompError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise RcompError(f"{path} is a directory; give a checkpoint file")
    return path
