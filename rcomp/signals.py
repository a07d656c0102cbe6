"""SIGTERM handled like Ctrl-C: the work unwinds, temporary files are removed, one line, exit 143.

Python turns SIGINT into :class:`KeyboardInterrupt`, so ``finally`` blocks (such as the one in
:func:`rcomp.io.atomic.atomic_open` that removes ``.NAME.*.rcomp-tmp``) run. SIGTERM, which
``kill``, ``timeout`` and job schedulers send, kills the process at once by default and leaves
temporary files behind. :func:`install_handlers` makes SIGTERM raise :class:`Terminated`, a
``KeyboardInterrupt``, so the same clean-up runs; :func:`interrupted` prints the one line and
gives the conventional exit code (128 + signal number).
"""

from __future__ import annotations

import signal
import sys

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives (after :func:`install_handlers`)."""

    exit_code = EXIT_SIGTERM


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    # a second SIGTERM during clean-up must not kill the process before the temp file is gone
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def install_handlers() -> None:
    """Make SIGTERM behave like SIGINT (call once, from the main thread, at start-up)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def interrupted(exc: KeyboardInterrupt, stream=None) -> int:
    """Print the one line for an interrupt and return its exit code: 143 for SIGTERM, 130 for Ctrl-C."""
    stream = sys.stderr if stream is None else stream
    what = "terminated" if isinstance(exc, Terminated) else "interrupted"
    print(f"rcomp: {what}; no output was written", file=stream)
    return getattr(exc, "exit_code", EXIT_SIGINT)
