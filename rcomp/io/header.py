"""Read and validate a safetensors header without importing torch.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON, then the
tensor data. Everything here is checked before a byte of tensor data is trusted, so a
truncated, oversized or lying file is refused with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from rcomp.errors import RcompError
from rcomp.io.bounded import open_regular
from rcomp.text import printable

#: Largest header accepted (bytes). Real rcomp headers are a few kB; safetensors itself caps at 100 MB.
#: The writer (:func:`rcomp.io.serialize.serialize`) refuses to write a larger one.
MAX_HEADER_BYTES = 16 * 1024 * 1024

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Header:
    path: Path
    size: int
    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


#: The first bytes of files that are PyTorch's own format (torch.save): a zip archive or a pickle.
_PYTORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def not_safetensors(path: Path, head: bytes, reason: str) -> RcompError:
    """The refusal for a file that is not safetensors; names the PyTorch case and its fix."""
    shown = printable(str(path))
    if head.startswith(_PYTORCH_MAGIC):
        return RcompError(f"{shown} is not an rcomp checkpoint: it is a PyTorch file: "
                          "make a checkpoint with rcomp convert FILE --arch NAME")
    return RcompError(f"{shown} is not a safetensors file ({reason}); check the path")


def _read_raw_header(path: Path) -> tuple[int, int, bytes]:
    """(file size, header length, header bytes), bounded by :data:`MAX_HEADER_BYTES`."""
    with open_regular(path, "checkpoint") as (fh, size):
        head = fh.read(8)
        if len(head) < 8:
            raise not_safetensors(path, head, f"only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES and 8 + n <= size and fh.read(1) == b"{":  # safetensors, but a header too big
            raise RcompError(f"{printable(str(path))} has a safetensors header of {n:,} bytes, more than the "
                             f"{MAX_HEADER_BYTES:,} rcomp reads (a damaged or edited file: its metadata is far larger "
                             "than rcomp writes)")
        if n == 0 or n > MAX_HEADER_BYTES:
            raise not_safetensors(path, head, f"header length {n} is not in 1..{MAX_HEADER_BYTES}")
        try:
            raw = fh.read(1)
            if raw != b"{":
                raise not_safetensors(path, head, "its header is not JSON")
            if 8 + n > size:
                raise RcompError(f"{printable(str(path))} is truncated: header says {n} bytes but the file has "
                                 f"{size}; re-download or re-create it")
            raw += fh.read(n - 1)
        except OSError as exc:
            raise RcompError(f"cannot read {printable(str(path))}: {exc.strerror or exc}") from None
    if len(raw) < n:
        raise RcompError(f"{printable(str(path))} is truncated (it shrank while being read); re-create it")
    return size, n, raw


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of a safetensors file; raises RcompError if it is not one."""
    path = Path(path)
    size, n, raw = _read_raw_header(path)
    shown = printable(str(path))
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: also ints of 4300+ digits
        raise RcompError(f"{shown} is not a safetensors file (its header is not JSON); check the path") from None
    if not isinstance(doc, dict):
        raise RcompError(f"{shown} is not a safetensors file (its header is not a JSON object)")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise RcompError(f"{shown} has malformed metadata (must map strings to strings)")
    tensors = {name: _tensor_info(shown, name, info, size - 8 - n) for name, info in doc.items()}
    spans = sorted((t.offsets[0], t.offsets[1], name) for name, t in tensors.items())
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise RcompError(f"{shown} is corrupt: tensors {_q(n0)} and {_q(n1)} overlap")
    return Header(path=path, size=size, header_len=n, tensors=tensors, metadata=meta)


def _q(value: object) -> str:
    """A value from the file, quoted and escaped for a one-line message."""
    return printable(repr(value), 80)


def _tensor_info(shown: str, name: str, info: object, data_len: int) -> TensorInfo:
    """One header entry, checked: known dtype, sane shape, offsets inside the data, size matching."""
    if not isinstance(info, dict):
        raise RcompError(f"{shown}: entry {_q(name)} in the header is not an object")
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise RcompError(f"{shown}: tensor {_q(name)} has unsupported dtype {_q(dtype)}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise RcompError(f"{shown}: tensor {_q(name)} has an invalid shape {_q(shape)}")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise RcompError(f"{shown}: tensor {_q(name)} has invalid data offsets {_q(offs)}")
    t = TensorInfo(name, dtype, tuple(shape), (offs[0], offs[1]))
    begin, end = offs
    if not (0 <= begin <= end <= data_len):
        raise RcompError(f"{shown} is truncated or corrupt: tensor {_q(name)} lies outside the file's data")
    if end - begin != t.numel * DTYPE_SIZES[dtype]:
        raise RcompError(f"{shown} is corrupt: tensor {_q(name)} size does not match its shape and dtype")
    return t


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a regular file's content (a FIFO or device is refused, not read forever)."""
    h = hashlib.sha256()
    with open_regular(path) as (fh, _size):
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
