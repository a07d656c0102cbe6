"""What ``rcomp info`` reports about a checkpoint, read from its header alone (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def describe(path: Path) -> dict[str, Any]:
    """Everything ``info`` reports, read from the header and a streaming sha256 of the file."""
    from rcomp.io.format import CheckpointMeta
    from rcomp.io.header import read_header, sha256_file

    header = read_header(path)
    meta = CheckpointMeta.from_metadata(header.metadata, where=str(path))
    params = meta.stats.get("params")
    if not isinstance(params, int):
        params = sum(t.numel for n, t in header.tensors.items()
                     if n.startswith("net.") and not n.endswith(_BUFFER_SUFFIXES))
    comp = meta.compression
    structure = comp.get("structure", {})
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "size_bytes": header.size,
        "format_version": int(header.metadata.get("rcomp.format", "0")),
        "arch": meta.arch.name,
        "arch_kwargs": meta.arch.kwargs,
        "input": {"shape": list(meta.input.shape), "range": meta.input.range, "mean": meta.input.mean,
                  "std": meta.input.std},
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "dataset": meta.dataset,
        "params": params,
        "tensors": len(header.tensors),
        "pruned": bool(comp.get("pruning") or structure),
        "pruning": comp.get("pruning"),
        "layers": structure,
        "quantization": comp.get("quantization"),
        "history": meta.history,
    }
