"""Text that came from a file, made safe for a terminal; commands shown as a shell would read them.

Strings from checkpoint metadata, recipes or file names may hold terminal control sequences
(``ESC [ ...``, carriage returns, C1 controls) that would rewrite what the user sees. Every such
string is passed through :func:`printable` before it is printed or put in an error message.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

# C0 controls, DEL, C1 controls, and the Unicode line/paragraph separators and bidi overrides
# and lone UTF-16 surrogates (from JSON "\\ud800" or undecodable file names), which no terminal can encode
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    ch = m.group(0)
    special = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}
    if ch in special:
        return special[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(s: object, limit: int | None = 200) -> str:
    """``s`` as text with every control character escaped (``\\x1b``, ``\\r``...), cut to ``limit``.

    >>> printable("red\\x1b[31m")
    'red\\\\x1b[31m'
    """
    text = _UNSAFE.sub(_escape, str(s))
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return text


def shell_quote(args: Iterable[object]) -> str:
    """A command line as a POSIX shell would read it, control characters escaped.

    >>> shell_quote(["rcomp", "prune", "my model.safetensors"])
    "rcomp prune 'my model.safetensors'"
    """
    return " ".join(shlex.quote(printable(a, limit=None)) for a in args)


def echo(value: object, limit: int = 80) -> str:
    """A value the user gave, quoted for an error message and cut to ``limit`` characters (a 900 kB
    option value is shown as its start and an ellipsis, not whole)."""
    text = printable(repr(value), limit=None)
    return text if len(text) <= limit else text[: limit - 3] + "..."
