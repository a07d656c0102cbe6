"""Catalogues: every family of named things (attacks, pruning importances, quantization modes,
architectures, datasets) lists its members once, in one torch-free module next to its code.

An :class:`Entry` holds a member's name, a lazy ``"module:object"`` reference to its code, the
options it takes, its help line and its paper. A :class:`Catalogue` holds a family's built-in
entries and, for families open to plugins, the entries installed packages declare as Python entry
points (group ``rcomp.attacks``, ``rcomp.importances``, ``rcomp.architectures``,
``rcomp.datasets``)::

    # a plugin package's pyproject.toml
    [project.entry-points."rcomp.attacks"]
    myattack = "my_pkg.rcomp_plugin:ENTRY"     # an rcomp.catalog.Entry (or the factory itself)

Plugins are found lazily: only when a catalogue is listed, or when a name is not built in. Looking
a name up reads the installed packages' metadata only; the plugin's module is imported when the
entry is used or listed with its help. A plugin that fails to load gives a one-line warning naming
its package and is left out; a plugin may not take a built-in name. Files (checkpoints, configs,
recipes) only ever name entries by catalogue name, never code.

Pure Python, no torch.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rcomp.errors import RcompError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class Entry:
    """One member of a family: what users type, where its code lives, what it takes, what it is."""

    name: str
    #: ``"package.module:object"``, imported only when the entry is used
    ref: str
    help: str = ""
    paper: str = ""
    #: the options it accepts, by option name (their declarations live with the family's options)
    takes: tuple[str, ...] = ()
    #: family-specific facts (e.g. an importance's ``needs_data``, a dataset's shape)
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: the installed distribution that declared it (plugins only)
    plugin: str | None = None

    def load(self) -> Any:
        """The object ``ref`` names (imports its module)."""
        mod_name, _, attr = self.ref.partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - a broken plugin is one line, never a traceback
            if self.plugin is None:
                raise
            raise RcompError(f"plugin {self.name!r} from package {self.plugin} failed to load ({type(exc).__name__}: "
                             f"{_first_line(exc)}); fix or uninstall {self.plugin}") from None
        return obj

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:160]


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Catalogue:
    """A family's entries: built-ins in order, then installed plugins (see the module docstring)."""

    def __init__(self, family: str, entries: Sequence[Entry], *, group: str | None = None,
                 flag: str = "", listing: str = "", coerce: Callable[[str, Any, str], Entry] | None = None):
        self.family = family                 # "attack": what messages call one entry
        self.group = group                   # entry-point group, None: closed to plugins
        self.flag = flag                     # the option naming an entry, e.g. --attack
        self.listing = listing               # where users see them all, e.g. rcomp info --attacks
        self._coerce = coerce                # turns what a plugin's entry point loads into an Entry
        self.builtin: dict[str, Entry] = {}
        for e in entries:
            if e.name in self.builtin:
                raise ValueError(f"{family} {e.name!r} is declared twice")
            self.builtin[e.name] = e
        self._plugin_points: dict[str, Any] | None = None
        self._plugins: dict[str, Entry] = {}

    # ----- names ------------------------------------------------------------------------------
    def builtin_names(self) -> tuple[str, ...]:
        return tuple(self.builtin)

    def plugin_names(self) -> tuple[str, ...]:
        """Names installed plugins declare (metadata only: no plugin module is imported)."""
        return tuple(self._points())

    def names(self) -> tuple[str, ...]:
        return self.builtin_names() + self.plugin_names()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.builtin or name in self._points())

    def choices(self) -> Choices:
        """A lazy sequence of the names, for an option's ``choices`` (built-ins cost nothing)."""
        return Choices(self)

    # ----- entries ----------------------------------------------------------------------------
    def get(self, name: str) -> Entry:
        """The entry called ``name``; an unknown name is a one-line error with the choices."""
        key = str(name).strip().lower()
        if key in self.builtin:
            return self.builtin[key]
        if key in self._points():
            return self._plugin(key)
        raise self.unknown(name)

    def entries(self, plugins: bool = True) -> list[Entry]:
        """Every entry (plugins imported, broken ones warned about and left out)."""
        out = list(self.builtin.values())
        if plugins:
            for name in self._points():
                try:
                    out.append(self._plugin(name))
                except RcompError as exc:
                    warn(str(exc))
        return out

    def load(self, name: str) -> Any:
        return self.get(name).load()

    def unknown(self, name: Any) -> RcompError:
        import difflib

        names = self.names()
        close = difflib.get_close_matches(str(name).strip().lower(), names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        where = f"{self.flag} " if self.flag else ""
        return RcompError(f"unknown {self.family} {str(name)!r}{hint}; {where}takes one of {', '.join(names)}"
                          + (f" (see {self.listing})" if self.listing and self.group else ""))

    def help_names(self, last: str = "or") -> str:
        """``a, b or c`` of the built-ins, plus where plugins are listed (no plugin lookup)."""
        b = list(self.builtin)
        text = ", ".join(b[:-1]) + f" {last} {b[-1]}" if len(b) > 1 else "".join(b)
        if self.group and self.listing:
            text += f" (installed plugins: {self.listing})"
        return text

    # ----- plugins ----------------------------------------------------------------------------
    def _points(self) -> dict[str, Any]:
        if self._plugin_points is None:
            self._plugin_points = {} if self.group is None else self._scan()
        return self._plugin_points

    def _scan(self) -> dict[str, Any]:
        from importlib.metadata import entry_points

        found: dict[str, Any] = {}
        try:
            points = entry_points(group=self.group)
        except Exception as exc:  # noqa: BLE001 - broken metadata must not break unrelated commands
            warn(f"cannot read installed {self.group} plugins: {_first_line(exc)}")
            return found
        for ep in points:
            pkg = _dist_name(ep)
            name = ep.name.strip().lower()
            if name in self.builtin:
                warn(f"ignoring {self.group} plugin {name!r} from package {pkg}: {name!r} is a built-in {self.family}")
                continue
            if not _NAME.match(name):
                warn(f"ignoring {self.group} plugin {ep.name!r} from package {pkg}: a name is lower-case letters, "
                     "digits, '-', '_' or '.'")
                continue
            if name in found:
                warn(f"ignoring {self.group} plugin {name!r} from package {pkg}: package "
                     f"{_dist_name(found[name])} declares it too")
                continue
            found[name] = ep
        return found

    def _plugin(self, name: str) -> Entry:
        if name in self._plugins:
            return self._plugins[name]
        ep = self._points()[name]
        pkg = _dist_name(ep)
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001
            raise RcompError(f"{self.group} plugin {name!r} from package {pkg} failed to load "
                             f"({type(exc).__name__}: {_first_line(exc)}); fix or uninstall {pkg}") from None
        try:
            entry = _as_entry(name, obj, ep.value, pkg, self._coerce)
        except (TypeError, ValueError) as exc:
            raise RcompError(f"{self.group} plugin {name!r} from package {pkg} is malformed: {_first_line(exc)}"
                             ) from None
        self._plugins[name] = entry
        return entry

    def reset(self) -> None:
        """Forget what was found (tests install plugins at run time)."""
        self._plugin_points, self._plugins = None, {}


def _dist_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or getattr(dist, "metadata", {}).get("Name") if dist is not None else None
    return str(name or ep.value.partition(":")[0].split(".")[0])


def _as_entry(name: str, obj: Any, value: str, pkg: str, coerce) -> Entry:
    """What a plugin's entry point loads -> an Entry named ``name``: an Entry (its ref may be lazy), a
    mapping of Entry fields, or the object itself (a class or factory: ``takes``/``paper`` attributes
    and the first line of its docstring describe it)."""
    import dataclasses

    if isinstance(obj, Entry):
        return dataclasses.replace(obj, name=name, plugin=pkg)
    if isinstance(obj, Mapping):
        fields = {k: v for k, v in obj.items() if k in {f.name for f in dataclasses.fields(Entry)}}
        fields.setdefault("ref", value)
        fields["takes"] = tuple(fields.get("takes", ()))
        return Entry(**{**fields, "name": name, "plugin": pkg})
    if coerce is not None:
        return coerce(name, obj, value)
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return Entry(name, value, help=doc[0] if doc else "", paper=str(getattr(obj, "paper", "")),
                 takes=tuple(getattr(obj, "takes", ())), extra=dict(getattr(obj, "extra", {}) or {}), plugin=pkg)


class Choices(Sequence):
    """An option's choices backed by a catalogue: membership of a built-in name costs nothing;
    anything else (iterating, an unknown name) reads the installed plugins' metadata."""

    def __init__(self, cat: Catalogue):
        self.catalogue = cat

    def __contains__(self, name: object) -> bool:
        return name in self.catalogue

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.catalogue.names())

    def __getitem__(self, i):  # type: ignore[override]
        return self.catalogue.names()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.catalogue.names())

    def __repr__(self) -> str:
        return f"Choices({self.catalogue.family})"
