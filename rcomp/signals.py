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


def interrupt_in(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind ``exc``, else None. Libraries catch it in broad ``except`` blocks and
    raise their own error in its place (torch.export: TorchExportError <- AttributeError <- KeyboardInterrupt),
    which rcomp would otherwise report as that library's failure, exit 2, instead of an interrupt."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return None


def reraise_interrupt(exc: BaseException) -> None:
    """Raise the interrupt behind ``exc`` (see :func:`interrupt_in`), if there is one: called first in every
    ``except Exception`` that turns a library's failure into one line."""
    ki = interrupt_in(exc)
    if ki is not None and ki is not exc:
        raise ki from None
