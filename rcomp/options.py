"""Every option of every stage, declared once.

A stage's configuration is a dataclass whose fields are declared with :func:`opt`: the field gives
the name, type and default; the declaration gives the command-line flags, the help text, the
allowed range and whether a file (``--config``, a recipe) may set it. The CLI's options, the
``--config`` and recipe keys, their validation and their help text are all derived from it, and
:func:`make_config` validates values once, at the boundary, before torch is imported.

Pure Python: importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError
from rcomp.parsing import Eps, parse_eps, parse_eps_list, parse_number, parse_shape
from rcomp.text import echo

#: value kinds and what they become: see :meth:`Option.parse`
KINDS = ("str", "choice", "int", "float", "number", "eps", "eps_list", "fraction", "bool", "path", "shape",
         "floats", "ints", "json", "names", "repeat")


@dataclass(frozen=True)
class Option:
    """How one configuration field appears to users."""

    flags: tuple[str, ...]
    kind: str = "str"
    help: str = ""
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    min_open: bool = False          # the minimum itself is not allowed
    max_open: bool = False
    secondary: str | None = None    # --no-x for a bool that has both forms
    file_ok: bool = True            # may --config files and recipes set it?
    file_note: str = ""             # why not, said when a file tries
    #: refuses some values from files (e.g. a user factory ``pkg.mod:fn``); returns a reason or None
    file_check: Callable[[Any], str | None] | None = None
    metavar: str | None = None
    hint: str = ""                  # added to every refusal of a value, e.g. what is supported
    name: str = ""                  # filled in by :func:`options_of`
    model_ok: bool = False          # a path option that also takes a loaded model (the Python API)
    default: Any = None

    @property
    def flag(self) -> str:
        """The long flag, e.g. ``--attack`` (what messages name)."""
        return next((f for f in self.flags if f.startswith("--")), self.flags[0])

    @property
    def key(self) -> str:
        """The option name as users type it in files: ``data-dir``."""
        return self.flag.lstrip("-")

    def parse(self, value: Any) -> Any:
        """A value from the command line (text) or a file (typed YAML) -> the typed value, validated."""
        if value is None:
            return None
        if not self.hint:
            return self._parse(value)
        try:
            return self._parse(value)
        except RcompError as exc:
            raise RcompError(f"{exc}; {self.hint}") from None

    def _parse(self, value: Any) -> Any:
        f = self.flag
        k = self.kind
        if k == "bool":
            return _bool(value, f)
        if k in ("str", "choice"):
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            s = str(value).strip()
            if k == "choice":
                s = s.lower()
                if s not in self.choices:
                    raise self.unknown(value)
            return s
        if k == "path":
            if self.model_ok and hasattr(value, "meta") and callable(value):
                return value
            if isinstance(value, bool) or not isinstance(value, (str, os.PathLike, int)):  # int: a YAML name like 2024
                what = "a path or a model loaded with rcomp.load" if self.model_ok else "a path"
                raise RcompError(f"{self.key} takes {what}, not a {type(value).__name__}")
            return Path(str(value)) if isinstance(value, int) else Path(value)
        if k == "repeat":  # an option given several times: --set A=1 --set B=2
            return tuple(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if k == "eps":
            return parse_eps(str(value), f)
        if k == "eps_list":  # floats that keep their text for report keys (pgd@8/255)
            return parse_eps_list(value, f)
        if k == "names":
            parts = tuple(p.lower() if self.choices else p for p in _parts(value))
            bad = [p for p in parts if self.choices and p not in self.choices]
            if bad:
                raise self.unknown(bad[0])
            return parts
        if k == "shape":
            return tuple(value) if isinstance(value, (list, tuple)) and _shape_ok(value) else parse_shape(
                ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value), f)
        if k == "floats":
            vals = tuple(parse_number(p, f) for p in _parts(value))
            if not vals:
                raise RcompError(f"{f} is empty; give comma-separated numbers, e.g. 0.5,0.5,0.5")
            return vals
        if k == "ints":  # whole numbers, each in range: --save-at 9,36,67
            vals = tuple(_int(p, f) for p in _parts(value))
            if not vals:
                raise RcompError(f"{f} is empty; give comma-separated whole numbers, e.g. 9,36,67")
            for v in vals:
                self._check_range(v, v)
            return vals
        if k == "json":
            return _json_object(value, f)
        if k == "int":
            v = _int(value, f)
        else:  # float, number, fraction
            v = parse_number(str(value), f) if not isinstance(value, (int, float)) or isinstance(value, bool) \
                else float(value)
            if not math.isfinite(v):
                raise RcompError(f"{f} {echo(value)} is not a finite number")
            if k == "fraction" and not 0 < v < 1:
                raise RcompError(f"{f} {echo(value)} must lie strictly between 0 and 1, e.g. {f} 0.5")
        self._check_range(v, value)
        return v

    def unknown(self, value: Any) -> RcompError:
        """'unknown attack 'pgdd' for --attack; choose one of ... (did you mean pgd?)'."""
        import difflib

        close = difflib.get_close_matches(str(value).strip().lower(), self.choices, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return RcompError(f"unknown {self.key} {echo(value)} for {self.flag}; choose one of {', '.join(self.choices)}{hint}")

    def _check_range(self, v: float, raw: Any) -> None:
        lo, hi = self.min, self.max
        bad_lo = lo is not None and (v <= lo if self.min_open else v < lo)
        bad_hi = hi is not None and (v >= hi if self.max_open else v > hi)
        if bad_lo or bad_hi:
            raise RcompError(f"{self.flag} {echo(raw)} is out of range: {self.range_text()}")

    def range_text(self) -> str:
        lo = "" if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
        hi = "" if self.max is None else f"{'<' if self.max_open else '<='} {self.max:g}"
        return " and ".join(p for p in (lo, hi) if p) or "any value"

    def help_text(self) -> str:
        """The help line: the declared help, plus the default where one is shown."""
        h = self.help
        if self.default not in (None, False, ()) and "default" not in h.lower():
            d = ",".join(map(str, self.default)) if isinstance(self.default, tuple) else self.default
            h = f"{h} [default: {d}]"
        return h


def _parts(value: Any) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(p).strip() for p in items if str(p).strip()]


def _shape_ok(v) -> bool:
    from rcomp.parsing import check_shape_caps

    ok = len(v) == 3 and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 65536 for d in v)
    if ok:
        check_shape_caps(v)
    return ok


def _bool(value: Any, flag: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise RcompError(f"{flag} {echo(value)} is not true or false")


def _int(value: Any, flag: str) -> int:
    if isinstance(value, bool):
        raise RcompError(f"{flag} {echo(value)} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        if len(str(value).strip()) > 100:  # int() of huge text is slow; no option takes such a number
            raise ValueError
        return int(str(value).strip())
    except ValueError:
        raise RcompError(f"{flag} {echo(value)} is not an integer") from None


def _json_object(value: Any, flag: str) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    try:
        v = json.loads(str(value)) if str(value).strip() else {}
    except json.JSONDecodeError:
        v = None
    if not isinstance(v, dict):
        raise RcompError(f"{flag} must be a JSON object, e.g. '{{\"width\": 32}}'")
    return v


def opt(default: Any, *flags: str, **kw: Any) -> Any:
    """Declare a configuration field: ``ratio: float | None = opt(None, "--ratio", kind="fraction", help=...)``."""
    return field(default=default, metadata={"option": Option(flags=flags, default=default, **kw)})


def options_of(config_cls: type) -> list[Option]:
    """The declared options of a config dataclass, in field order, with their names filled in."""
    out = []
    for f in dataclasses.fields(config_cls):
        o = f.metadata.get("option")
        if o is not None:
            out.append(dataclasses.replace(o, name=f.name, default=f.default))
    return out


def option_index(config_cls: type) -> dict[str, Option]:
    """Every spelling users may write -> option: ``data-dir``, ``data_dir``, flag names without dashes."""
    idx: dict[str, Option] = {}
    for o in options_of(config_cls):
        for spelling in (o.name, *[f.lstrip("-") for f in o.flags if f.startswith("--")]):
            idx[_norm(spelling)] = o
    return idx


def _norm(key: Any) -> str:
    return str(key).strip().lstrip("-").replace("_", "-").lower()


def lookup(config_cls: type, key: Any, command: str) -> Option:
    o = option_index(config_cls).get(_norm(key))
    if o is None:
        raise RcompError(f"command {command} has no option --{_norm(key)}; see rcomp {command} --help")
    return o


def make_config(config_cls: type, given: Mapping[str, Any] | None = None, *,
                from_file: Mapping[str, Any] | None = None, file_source: str = "", command: str = "",
                partial: bool = False) -> Any:
    """Build and validate a config: ``given`` (command line or Python keywords) wins over ``from_file``
    (a ``--config`` file or a recipe), which wins over the declared defaults.

    Keys are option names as users type them (``data-dir``, ``data_dir``, ``attack``). A file may not
    set options declared ``file_ok=False``; the refusal says why. ``partial`` checks the values given
    without building the config (for naming the file line of a single bad option).
    """
    values: dict[str, Any] = {}
    for key, raw in (from_file or {}).items():
        where = f"{file_source}: " if file_source else ""
        try:
            o = lookup(config_cls, key, command)
        except RcompError as exc:
            raise RcompError(f"{where}{exc}") from None
        if not o.file_ok:
            raise RcompError(f"{where}option {o.flag} may only be given on the command line"
                             + (f" ({o.file_note})" if o.file_note else ""))
        if o.file_check is not None and raw is not None:
            reason = o.file_check(raw)
            if reason:
                raise RcompError(f"{where}{o.flag} {echo(raw)}: {reason}")
        values[o.name] = _parse_at(o, raw, where)
    for key, raw in (given or {}).items():
        o = lookup(config_cls, key, command)
        values[o.name] = o.parse(raw)
    if partial:
        return values
    cfg = config_cls(**values)
    check = getattr(cfg, "check", None)
    if check is not None:
        check()
    return cfg


def _parse_at(o: Option, raw: Any, where: str) -> Any:
    try:
        return o.parse(raw)
    except RcompError as exc:
        raise RcompError(f"{where}{exc}") from None


def to_args(cfg: Any) -> list[str]:
    """The command-line arguments that give ``cfg`` (options left at their default are left out)."""
    args: list[str] = []
    for o in options_of(type(cfg)):
        v = getattr(cfg, o.name)
        if v == o.default or v is None:
            continue
        if o.kind == "bool":
            if v or o.secondary:
                args.append(o.flag if v else o.secondary)
            continue
        if isinstance(v, dict):
            text = json.dumps(v, sort_keys=True)
        elif isinstance(v, tuple):
            text = ",".join(map(str, v))
        else:
            text = repr(v) if isinstance(v, float) else str(v)
        args += [o.flag, text]
    return args


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config as JSON-able data (paths as strings, tuples as lists): provenance and fingerprints."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = [str(x) if isinstance(x, Eps) else x for x in v]  # eps as typed: fingerprints unchanged
        out[f.name] = v
    return out


# ---------------------------------------------------------------------------
# options several stages share (declared once here; a stage may change the default)
# ---------------------------------------------------------------------------

def seed_opt(default: int = 0):
    return opt(default, "--seed", kind="int", min=0, max=2**63 - 1,
               help="Random seed; the same seed gives the same result on CPU.")


def device_opt(default: str = "auto"):
    return opt(default, "--device", help="auto, cpu, cuda or cuda:N.")


def data_opt(default: str | None = None, help: str = "Dataset (rcomp info --datasets lists them)."):
    return opt(default, "--data", help=help)


def data_dir_opt():
    return opt(None, "--data-dir", kind="path", help="Dataset folder (default: $RCOMP_DATA, else ./data).")


def output_opt(help: str = "Output path (default: next to the input, with a descriptive suffix)."):
    return opt(None, "-o", "--output", kind="path", help=help)


def force_opt(help: str = "Overwrite an existing output file."):
    return opt(False, "--force", kind="bool", help=help, file_ok=False,
               file_note="overwriting is decided where the command is run")


def trust_opt(help: str = "Import the user factory a checkpoint names (only for files you trust)."):
    return opt(False, "--trust-factory", kind="bool", help=help, file_ok=False,
               file_note="it lets a checkpoint run code, so only the person running rcomp may allow it")


def n_opt(help: str = "Evaluate N points (default: all): a stratified sample of the split with the fixed "
                      "subset seed 0, the same points for every model and command."):
    return opt(None, "-n", "--n", kind="int", min=1, max=10**8, help=help)


def batch_opt(default: int, help: str = "Points per batch."):
    return opt(default, "--batch-size", kind="int", min=1, max=65536, help=help)


def json_opt():
    return opt(False, "--json", kind="bool", help="Print results as JSON on stdout.")
