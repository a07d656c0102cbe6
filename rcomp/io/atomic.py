"""Atomic, exclusive file writing: a temporary file in the same folder, fsync, then publish.

An interrupted or killed writer never leaves a file at the output path: either the
complete new file is there, or whatever was there before (nothing, or the old file).

Publishing is exclusive unless the caller forces: the finished temporary file is hard-linked
to the output name, which fails if the name exists, so of two processes racing to create the
same output exactly one wins and the other gets a one-line error. With force, only a regular
file (or a symlink to one) is ever replaced; a FIFO, a device or a directory is refused.
Files are created with the permissions the umask allows (``0666 & ~umask``), like ``open()``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from rcomp.errors import RcompError
from rcomp.text import printable

TMP_SUFFIX = ".rcomp-tmp"


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_replaceable(output: Path, force: bool) -> None:
    """Refuse an existing ``output`` unless ``force``; even with force, refuse what is not a regular file."""
    from rcomp.io.bounded import kind_of

    shown = printable(str(output))
    try:
        st = os.stat(output)
    except FileNotFoundError:
        if os.path.islink(output) and not force:
            raise RcompError(f"output {shown} already exists (a dangling symlink); pass force=True "
                             "(--force on the command line) or choose another path") from None
        return
    except OSError as exc:
        raise RcompError(f"output {shown} cannot be checked: {exc.strerror or exc}; choose another path") from None
    if stat.S_ISDIR(st.st_mode):
        raise RcompError(f"output {shown} is a directory; give a file path with -o")
    if not stat.S_ISREG(st.st_mode):
        raise RcompError(f"output {shown} is {kind_of(st.st_mode)}; rcomp replaces only regular files, "
                         "even with --force: choose another path")
    if not force:
        raise RcompError(f"output {shown} already exists; pass force=True (--force on the command line) "
                         "to overwrite it, or choose another path")


def check_writable_folder(output: Path) -> None:
    """The folder of ``output`` exists and a file can be created in it (probed, so read-only mounts count)."""
    parent = _folder(Path(output))
    shown = printable(str(parent), 80)
    if not parent.exists():
        raise RcompError(f"output folder {shown} does not exist; create it first")
    if not parent.is_dir():
        raise RcompError(f"output folder {shown} is not a directory; choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rcomp-probe.", suffix=TMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise RcompError(f"cannot create files in output folder {shown}: {exc.strerror or exc}; "
                         "choose a writable folder") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_output_path(output: Path, inputs: tuple[Path, ...] = (), force: bool = False) -> Path:
    """Check, before long work, that ``output`` can be created: call it before training or attacking.

    Refuses: writing over an input; an existing output without ``force``; anything but a regular
    file even with ``force``; a missing or unwritable folder.
    """
    output = Path(output)
    if any(ord(c) < 32 or ord(c) == 127 for c in str(output)):
        raise RcompError(f"output {printable(str(output), 80)} holds a control character (a newline, tab...): the "
                         "path printed on stdout would reach the next command in a pipe as another path; choose a "
                         "name without one")
    if str(output) in ("/dev/stdout", "/dev/stderr", "/dev/fd/1", "/dev/fd/2", "/proc/self/fd/1", "/proc/self/fd/2", "-"):
        raise RcompError(f"output {output} is not a file: rcomp writes checkpoints to a file with -o and prints "
                         "that file's path on stdout; pipe the path to the next rcomp command")
    try:
        for inp in inputs:
            inp = Path(inp)
            same = inp.exists() and output.exists() and os.path.samefile(inp, output)
            if same or output.resolve() == inp.resolve():
                raise RcompError(f"output {printable(str(output))} is the input file; choose another path with -o")
        check_replaceable(output, force)
        check_writable_folder(output)
    except OSError as exc:  # a name too long (ENAMETOOLONG), a deleted working directory...
        raise RcompError(f"output {printable(str(output), 80)} cannot be used: {exc.strerror or exc}; "
                         "choose another path") from None
    return output


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path, exclusive: bool) -> None:
    """Move the finished ``tmp`` to ``path``: a hard link when ``exclusive`` (fails if it exists)."""
    if not exclusive:
        check_replaceable(path, force=True)
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise RcompError(f"output {printable(str(path))} already exists (another process may have written it "
                         "meanwhile); pass force=True (--force on the command line) or choose another path") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        _publish_without_links(tmp, path)
        return
    os.unlink(tmp)


def _publish_without_links(tmp: str, path: Path) -> None:
    """Exclusive publish where the filesystem has no hard links: claim the name with O_EXCL, then replace."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise RcompError(f"output {printable(str(path))} already exists; pass force=True "
                         "(--force on the command line) or choose another path") from None
    os.replace(tmp, path)


def _fsync_folder(parent: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_open(path: Path, *, exclusive: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success it is published at ``path`` atomically.

    ``exclusive``: fail (RcompError) if ``path`` exists when publishing, instead of replacing it.
    """
    path = Path(path)
    parent = _folder(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path, exclusive)
        tmp = None
        _fsync_folder(parent)
    except OSError as exc:
        raise RcompError(f"could not write {printable(str(path))}: {exc.strerror or exc}; "
                         "check free space and permissions") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes | Callable[[BinaryIO], None], *, exclusive: bool = False) -> None:
    """Write ``data`` (bytes, or a function writing to a file object) to ``path`` atomically."""
    with atomic_open(path, exclusive=exclusive) as fh:
        if callable(data):
            data(fh)
        else:
            view = memoryview(data)
            chunk = 1 << 22
            for start in range(0, len(view), chunk):
                fh.write(view[start : start + chunk])


def atomic_write_text(path: Path, text: str, *, exclusive: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), exclusive=exclusive)
