"""Reading input files and pipes with bounds: regular files only, never more than asked.

A FIFO, a device such as ``/dev/zero``, a directory or a symlink loop given where a file is
expected is refused at once (the file is opened non-blocking, so a FIFO without a writer does
not hang), and what is read is capped, so an endless input cannot exhaust memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from rcomp.errors import RcompError
from rcomp.text import printable

#: A path piped on stdin is one short line; more than this is not a list of paths.
STDIN_MAX_BYTES = 64 * 1024
STDIN_MAX_LINES = 1000


def kind_of(mode: int) -> str:
    """'a FIFO', 'a directory'... for a ``st_mode``; 'a regular file' for files."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _open_error(path: Path, exc: OSError, what: str) -> RcompError:
    shown = printable(str(path))
    if exc.errno == errno.ENOENT:
        return RcompError(f"{what} {shown} does not exist; check the path")
    if exc.errno == errno.ELOOP:
        return RcompError(f"{what} {shown} is a symlink loop; point it at a real file")
    if exc.errno == errno.EISDIR:
        return RcompError(f"{what} {shown} is a directory; give a file")
    return RcompError(f"cannot read {what} {shown}: {exc.strerror or exc}; check the path and its permissions")


@contextlib.contextmanager
def open_regular(path: str | Path, what: str = "file") -> Iterator[tuple[BinaryIO, int]]:
    """Open ``path`` for reading if it is a regular file; yields ``(file, size)``.

    Opened with ``O_NONBLOCK`` so that a FIFO is refused instead of waiting for a writer.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _open_error(path, exc, what) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RcompError(f"{what} {printable(str(path))} is {kind_of(st.st_mode)}, not a regular file; give a file")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh, st.st_size


def check_regular(path: str | Path, what: str = "file") -> int:
    """Refuse anything but an existing, readable regular file; returns its size."""
    with open_regular(path, what) as (_fh, size):
        return size


def read_bounded(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes."""
    with open_regular(path, what) as (fh, size):
        if size > limit:
            raise RcompError(f"{what} {printable(str(path))} is {size} bytes, over the limit of {limit}; "
                             "is it the right file?")
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew while reading
        raise RcompError(f"{what} {printable(str(path))} is over the limit of {limit} bytes")
    return data


def read_stdin_lines(stream=None, max_bytes: int = STDIN_MAX_BYTES, max_lines: int = STDIN_MAX_LINES) -> list[str]:
    """The non-empty lines piped on stdin (paths printed by an upstream command), bounded.

    At most ``max_bytes`` are read: an endless or huge stdin is refused at once with one line
    instead of being read into memory.
    """
    import sys

    stream = sys.stdin if stream is None else stream
    if stream is None:
        return []
    raw = stream.buffer.read(max_bytes + 1) if hasattr(stream, "buffer") else stream.read(max_bytes + 1)
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    if len(text) > max_bytes:
        raise RcompError(f"stdin holds more than {max_bytes} bytes, not a list of checkpoint paths; "
                         "pipe the paths an rcomp command prints, or give the checkpoint as an argument")
    if "\x00" in text:
        raise RcompError("stdin holds binary data, not checkpoint paths; give the checkpoint as an argument")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > max_lines:
        raise RcompError(f"stdin holds {len(lines)} lines, more than the {max_lines} paths rcomp reads from a pipe")
    return lines
