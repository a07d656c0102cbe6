"""Deterministic safetensors serialisation.

``safetensors.torch.save`` keeps metadata in a hash map, so the header's key order (and the
file's bytes) change from call to call. rcomp writes the same layout itself with sorted keys,
so the same model gives byte-identical files; ``safetensors`` reads them as usual.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from rcomp.errors import RcompError
from rcomp.io.header import MAX_HEADER_BYTES
from rcomp.text import printable

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
#: torch dtype -> safetensors dtype name, for the dtypes rcomp checkpoints store.
DTYPES = _DTYPES


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes for ``tensors`` (sorted by name) with ``metadata``; byte-for-byte reproducible."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name} has dtype {t.dtype}, which rcomp checkpoints do not store")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:  # the writer enforces what the reader requires
        raise RcompError(f"the checkpoint header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES} bytes that "
                         "rcomp reads; shorten the metadata (class names, history) before saving")
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a regular file; nothing else is read, nothing unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from rcomp.io.bounded import check_regular

    check_regular(path, "checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RcompError(f"{printable(str(path))} could not be read as safetensors: {printable(first)}") from None
