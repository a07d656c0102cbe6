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

#: Largest header accepted (bytes). Real rcomp headers are a few kB; safetensors itself caps at 100 MB.
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


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of a safetensors file; raises RcompError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise RcompError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise RcompError(f"{path} is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise RcompError(f"{path} is not a safetensors file (only {size} bytes); check the path")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES:
                raise RcompError(
                    f"{path} is not a safetensors file (header length {n} is not in 1..{MAX_HEADER_BYTES}); "
                    "is it a pickle or a truncated download?"
                )
            if 8 + n > size:
                raise RcompError(f"{path} is truncated: header says {n} bytes but the file has {size}; re-download or re-create it")
            raw = fh.read(n)
    except OSError as exc:
        raise RcompError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RcompError(f"{path} is not a safetensors file (its header is not JSON); check the path") from None
    if not isinstance(doc, dict):
        raise RcompError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise RcompError(f"{path} has malformed metadata (must map strings to strings)")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise RcompError(f"{path}: entry {name!r} in the header is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise RcompError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
            raise RcompError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise RcompError(f"{path}: tensor {name!r} has invalid data offsets {offs!r}")
        t = TensorInfo(name, dtype, tuple(shape), (offs[0], offs[1]))
        begin, end = offs
        if not (0 <= begin <= end <= data_len):
            raise RcompError(f"{path} is truncated or corrupt: tensor {name!r} lies outside the file's data")
        if end - begin != t.numel * DTYPE_SIZES[dtype]:
            raise RcompError(f"{path} is corrupt: tensor {name!r} size does not match its shape and dtype")
        tensors[name] = t
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise RcompError(f"{path} is corrupt: tensors {n0!r} and {n1!r} overlap")
    return Header(path=path, size=size, header_len=n, tensors=tensors, metadata=meta)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
