"""A tiny progress bar for stderr, reusable by every command.

    with Progress(total=len(dataset), desc="attack") as bar:
        for x, y in loader:
            ...
            bar.update(len(y), acc=0.93)

When stderr is a terminal the bar is redrawn in place (at most every ``min_interval`` seconds);
otherwise nothing is drawn while running and one final summary line is printed when the block
ends without an exception (so logs stay readable). Nothing is ever written to stdout. Pure Python:
no torch import.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


class Progress:
    """Progress over ``total`` items (``None`` when unknown), labelled ``desc``.

    ``enabled=False`` silences it entirely; ``stream`` defaults to ``sys.stderr`` at construction.
    """

    def __init__(self, total: int | None, desc: str = "", *, enabled: bool = True, stream: TextIO | None = None,
                 min_interval: float = 0.1, width: int = 24):
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.width = width
        self.n = 0
        self._skipped = 0  # items done before this run (resumed): not counted in the rate
        self.postfix: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._tty = bool(enabled and getattr(self.stream, "isatty", lambda: False)())
        self._closed = False

    # ------------------------------------------------------------------
    def __enter__(self) -> Progress:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` items; keyword arguments are shown after the bar (latest values)."""
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self._tty:
            now = time.perf_counter()
            if now - self._last >= self.min_interval or (self.total is not None and self.n >= self.total):
                self._last = now
                self._draw("\r", "")

    def skip(self, n: int) -> None:
        """Advance by ``n`` items done earlier (read back, not computed): the rate and ETA leave them out."""
        self._skipped += n
        self.update(n)

    def close(self, ok: bool = True) -> None:
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        if self._tty:
            self._draw("\r", "\n")
        elif ok:
            self._draw("", "\n")

    # ------------------------------------------------------------------
    def line(self) -> str:
        """The text of the bar as it would be drawn now."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = (self.n - self._skipped) / elapsed
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(round(frac * self.width))
            parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {self.n}/{self.total}")
        else:
            parts.append(f"{self.n}")
        parts.append(f"{elapsed:.1f}s {rate:.1f}/s")
        if self.total and self.n < self.total and rate > 0:
            parts.append(f"ETA {(self.total - self.n) / rate:.0f}s")
        if self.postfix:
            parts.append(" ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items()))
        return " ".join(parts)

    def _draw(self, prefix: str, end: str) -> None:
        try:
            text = self.line()
            if self._tty:
                text = text.ljust(79)
            self.stream.write(prefix + text + end)
            self.stream.flush()
        except (OSError, ValueError):  # closed or broken stderr: progress is never worth a crash
            pass
