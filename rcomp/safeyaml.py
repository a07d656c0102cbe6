"""Safe, bounded YAML for config files and recipes.

``yaml.safe_load`` never runs code (no Python tags), but it does not bound work: a few hundred
bytes of nested aliases ("billion laughs") expand to billions of values for whoever walks the
result, and a deeply nested document exhausts the stack. Here every document is

* read only from a regular file, at most :data:`MAX_BYTES` (a FIFO or ``/dev/zero`` is refused);
* composed with a count of the nodes it stands for *after alias expansion*, refused over
  :data:`MAX_NODES`, and a nesting depth refused over :data:`MAX_DEPTH`;
* constructed with the safe constructor only.

Every failure is one :class:`~rcomp.errors.RcompError` line naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcomp.errors import RcompError
from rcomp.text import printable

MAX_BYTES = 1024 * 1024
MAX_NODES = 20_000
MAX_DEPTH = 64

_loader_class = None


def _loader():
    """A SafeLoader that counts expanded nodes and depth while composing (built once, lazily)."""
    global _loader_class
    if _loader_class is not None:
        return _loader_class
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream, what: str):
            super().__init__(stream)
            self._what, self._depth, self._total, self._weight = what, 0, 0, {}

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                anchor = self.peek_event().anchor
                node = super().compose_node(parent, index)
                if id(node) not in self._weight:
                    raise RcompError(f"{self._what}: alias *{printable(anchor, 40)} refers to a node that contains "
                                     "it; recursive YAML is refused")
                self._add(self._weight[id(node)], f"alias *{printable(anchor, 40)}")
                return node
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise RcompError(f"{self._what}: nesting deeper than {MAX_DEPTH} levels; flatten the document")
            before = self._total
            node = super().compose_node(parent, index)
            self._depth -= 1
            self._total += 1
            self._weight[id(node)] = self._total - before
            self._check()
            return node

        def construct_mapping(self, node, deep=False):
            """Refuse a key given twice in one mapping (YAML would keep the last one silently)."""
            if isinstance(node, yaml.MappingNode):
                lines: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # keys merged in with << may be overridden: that is what << is for
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        first = lines.get(key)
                    except TypeError:
                        continue  # an unhashable key: the constructor refuses it with its own message
                    if first is not None:
                        raise RcompError(f"{self._what}: key {printable(repr(key), 60)} is given twice in one "
                                         f"mapping (lines {first} and {line}); keep one")
                    lines[key] = line
            return super().construct_mapping(node, deep=deep)

        def _add(self, weight: int, what: str) -> None:
            self._total += weight
            self._check(what)

        def _check(self, what: str = "values") -> None:
            if self._total > MAX_NODES:
                raise RcompError(f"{self._what}: the document expands to more than {MAX_NODES} values "
                                 f"({what}); YAML alias bombs and huge documents are refused")

    _loader_class = BoundedLoader
    return BoundedLoader


def _yaml_error(exc: Exception, what: str) -> RcompError:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = str(exc).strip()
    problem = getattr(exc, "problem", None) or (text.splitlines()[0] if text else type(exc).__name__)
    return RcompError(f"{what}: not valid YAML ({printable(problem, 120)}{where}); fix the file")


def _run(text: str, what: str, compose: bool):
    import yaml

    if len(text) > MAX_BYTES:
        raise RcompError(f"{what}: {len(text)} characters is over the {MAX_BYTES} a config or recipe may have")
    loader = _loader()(text, printable(what))
    try:
        return loader.get_single_node() if compose else loader.get_single_data()
    except RcompError:
        raise
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, printable(what)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. an int of 5000 digits
        raise RcompError(f"{printable(what)}: a value cannot be read ({type(exc).__name__}: "
                         f"{printable(str(exc), 100)}); fix the file") from None
    finally:
        loader.dispose()


def load_yaml_text(text: str, what: str = "YAML") -> Any:
    """The Python value of a YAML document, with bounded size, depth and alias expansion."""
    return _run(text, what, compose=False)


def compose_yaml_text(text: str, what: str = "YAML"):
    """The YAML node tree of a document (for line numbers), with the same bounds as :func:`load_yaml_text`."""
    return _run(text, what, compose=True)


def read_yaml_source(path: str | Path, what: str = "YAML file") -> str:
    """The text of a YAML file: a regular file of at most :data:`MAX_BYTES`, UTF-8."""
    from rcomp.io.bounded import read_bounded

    data = read_bounded(path, MAX_BYTES, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RcompError(f"{what} {printable(str(path))} is not UTF-8 text; is it the right file?") from None


def load_yaml_file(path: str | Path, what: str = "YAML file") -> Any:
    """The value of a YAML file, read and parsed with every bound of this module."""
    return load_yaml_text(read_yaml_source(path, what), what=f"{what} {path}")
