"""Parsing of option values written as text: numbers like ``8/255``, eps lists, C,H,W shapes,
JSON objects. Pure Python; every error is one line naming the option and the fix."""

from __future__ import annotations

import json
import math
import re

from rcomp.errors import RcompError
from rcomp.text import echo

# unambiguous (no two ways to split a run of digits), so matching is linear, never a ReDoS
_NUM = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
#: a number written as text is at most this long (Python's float() and int() are slow on huge text)
MAX_NUMBER_CHARS = 100
#: implied input sizes: channels, pixels a side, values in one image (as rcomp.models.checks caps files)
MAX_CHANNELS, MAX_SIDE, MAX_PIXELS = 4096, 16384, 1 << 26


def parse_number(text: str, what: str) -> float:
    """``0.03``, ``8/255`` or ``1e-3`` to a float; anything else is a one-line error."""
    s = str(text).strip()
    if len(s) > MAX_NUMBER_CHARS:
        raise RcompError(f"{what} {echo(s)} is not a number ({len(s)} characters); write e.g. 0.03 or 8/255")
    m = re.fullmatch(rf"({_NUM})\s*/\s*({_NUM})", s)
    try:
        if m:
            den = float(m.group(2))
            if den == 0:
                raise RcompError(f"{what} {echo(s)} divides by zero; write e.g. 8/255")
            v = float(m.group(1)) / den
        else:
            v = float(s)
    except ValueError:
        raise RcompError(f"{what} {echo(s)} is not a number; write e.g. 0.03 or 8/255") from None
    if not math.isfinite(v):
        raise RcompError(f"{what} {echo(s)} is not a finite number")
    return v


def parse_eps(text: str, what: str = "--eps") -> float:
    v = parse_number(text, what)
    if not 0 <= v <= 1:
        raise RcompError(f"{what} {echo(text)} is outside [0, 1]; eps is in pixel units of [0, 1] images (e.g. 8/255)")
    return v


class Eps(float):
    """A budget in pixel units (a float) that remembers how the user wrote it: ``str(Eps("8/255"))``
    is ``8/255``, so report keys (``pgd@8/255``) read as typed while the library gets the number."""

    __slots__ = ("text",)

    def __new__(cls, value: float, text: str | None = None) -> Eps:
        self = super().__new__(cls, value)
        self.text = str(text).strip() if text is not None else repr(float(value))
        return self

    def __str__(self) -> str:
        return self.text

    def __reduce__(self):
        return (Eps, (float(self), self.text))


def eps_text(value: float) -> str:
    """How an eps reads in keys and messages: as typed (an :class:`Eps`), else ``str(value)``."""
    return value.text if isinstance(value, Eps) else str(value).strip()


def parse_eps_list(value, what: str = "--eps") -> tuple[Eps, ...]:
    """``2/255,8/255`` (text, or a list of texts and numbers) -> eps values, each checked once."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    parts = [str(p).strip() for p in items if str(p).strip()]
    if not parts:
        raise RcompError(f"{what} is empty; write e.g. 8/255 or 2/255,8/255")
    return tuple(Eps(parse_eps(p, what), p) for p in parts)


def parse_thresholds(text: str | None, what: str = "--fail-under") -> dict[str, float]:
    """``clean=0.9,pgd=0.4,worst=0.35`` -> ``{metric: accuracy}``, each an accuracy in [0, 1]. Which
    metrics exist (the attack keys) is checked where the attacks are known."""
    out: dict[str, float] = {}
    for part in str(text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise RcompError(f"{what} {part.strip()!r} must be METRIC=VALUE, e.g. clean=0.9,pgd=0.4")
        key, val = (s.strip() for s in part.split("=", 1))
        v = parse_number(val, f"{what} {key}")
        if not 0 <= v <= 1:
            raise RcompError(f"{what} {key}={val} must be an accuracy in [0, 1]")
        out[key] = v
    return out


def parse_shape(text: str, what: str = "--input-shape") -> tuple[int, int, int]:
    parts = str(text).replace("x", ",").split(",")
    try:
        if len(str(text)) > MAX_NUMBER_CHARS:
            raise ValueError
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise RcompError(f"{what} {echo(text)} must be C,H,W integers, e.g. 3,32,32") from None
    if len(dims) != 3 or any(d < 1 or d > 65536 for d in dims):
        raise RcompError(f"{what} {echo(text)} must be three positive integers C,H,W, e.g. 3,32,32")
    check_shape_caps(dims, what)
    return dims  # type: ignore[return-value]


def parse_floats(text: str, what: str) -> list[float]:
    return [parse_number(p, what) for p in str(text).split(",") if p.strip()]


def parse_json_kwargs(text: str | None, what: str = "--arch-kwargs") -> dict:
    if not text:
        return {}
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        raise RcompError(f"{what} must be a JSON object, e.g. '{{\"width\": 32}}'") from None
    if not isinstance(v, dict):
        raise RcompError(f"{what} must be a JSON object, e.g. '{{\"width\": 32}}'")
    return v


def check_shape_caps(dims, what: str = "--input-shape") -> None:
    """Refuse input shapes whose implied sizes no model should be built for (before anything is built)."""
    c, h, w = dims
    if c > MAX_CHANNELS or h > MAX_SIDE or w > MAX_SIDE or c * h * w > MAX_PIXELS:
        raise RcompError(f"{what} {c},{h},{w} is over the limits ({MAX_CHANNELS} channels, {MAX_SIDE} pixels a side, "
                         f"{MAX_PIXELS} values an image); give the model's real input shape")
