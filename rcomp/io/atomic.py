"""Atomic file writing: a temporary file in the same folder, fsync, rename.

An interrupted or killed writer never leaves a file at the output path: either the
complete new file is there, or whatever was there before (nothing, or the old file).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from rcomp.errors import RcompError

TMP_SUFFIX = ".rcomp-tmp"


def check_output_path(output: Path, inputs: tuple[Path, ...] = (), force: bool = False) -> Path:
    """Refuse to write over an input, or over an existing file without ``force``."""
    output = Path(output)
    if output.is_dir():
        raise RcompError(f"output {output} is a directory; give a file path with -o")
    for inp in inputs:
        inp = Path(inp)
        if inp.exists() and output.exists() and os.path.samefile(inp, output):
            raise RcompError(f"output {output} is the input file; choose another path with -o")
        if output.resolve() == inp.resolve():
            raise RcompError(f"output {output} is the input file; choose another path with -o")
    if output.exists() and not force:
        raise RcompError(f"output {output} already exists; pass --force to overwrite it or choose another -o")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        raise RcompError(f"output folder {parent} does not exist; create it first")
    return output


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        raise RcompError(f"could not write {path}: {exc.strerror or exc}; check free space and permissions") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a file object) to ``path`` atomically."""
    with atomic_open(path) as fh:
        if callable(data):
            data(fh)
        else:
            view = memoryview(data)
            chunk = 1 << 22
            for start in range(0, len(view), chunk):
                fh.write(view[start : start + chunk])


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
