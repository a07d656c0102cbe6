"""Reading an ONNX file written by ``rcomp export``: bounded, validated, no torch (``rcomp info`` uses it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError
from rcomp.io.format import PREFIX, CheckpointMeta
from rcomp.text import printable

#: metadata_props key (besides the checkpoint's own ``rcomp.*`` keys) holding the export record
ONNX_KEY = f"{PREFIX}onnx"
#: ONNX files are read whole; protobuf itself caps a file without external data at 2 GiB
MAX_ONNX_BYTES = 2 * 1024**3


def read_model(path: Path):
    """``(bytes, ModelProto, metadata_props dict)`` of an ONNX file, bounded; refuses what is not one."""
    from rcomp.io.bounded import read_bounded
    from rcomp.onnx.deps import require

    require("reading an ONNX file")
    import onnx

    shown = printable(str(path))
    data = read_bounded(path, MAX_ONNX_BYTES, what="ONNX file")
    if not data:
        raise RcompError(f"{shown} is empty (0 bytes); give a file written by rcomp export")
    try:
        proto = onnx.load_from_string(data)
    except Exception:  # noqa: BLE001 - protobuf's decode errors
        raise RcompError(f"{shown} is not an ONNX model (it does not parse); give a file written by rcomp export") \
            from None
    if not proto.graph.input or not proto.graph.output:
        raise RcompError(f"{shown} is an ONNX file without graph inputs or outputs; give a file written by rcomp export")
    return data, proto, {p.key: p.value for p in proto.metadata_props}


def meta_of(props: dict[str, str], where: str) -> tuple[CheckpointMeta, dict[str, Any]]:
    """The checkpoint metadata and the export record stored in an ONNX file's ``metadata_props``."""
    if f"{PREFIX}format" not in props:
        raise RcompError(f"{where} is an ONNX file without rcomp metadata (input spec, classes); export the model "
                         "with rcomp export CKPT -o model.onnx")
    try:
        meta = CheckpointMeta.from_metadata(props, where=where)
    except RcompError as exc:  # its fixes name rcomp convert, which does not take ONNX files
        text = str(exc).replace("; re-create it with rcomp convert", "; re-export the checkpoint with rcomp export")
        raise RcompError(text) from None
    raw = meta.extra.pop("onnx", None)
    try:
        info = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise RcompError(f"{where} has malformed metadata field {ONNX_KEY} (not a JSON object)")
    bad = _record_problem(info)
    if bad:
        raise RcompError(f"{where} has malformed metadata field {ONNX_KEY} ({bad}); re-export the checkpoint with "
                         "rcomp export")
    return meta, info


def _record_problem(info: dict[str, Any]) -> str | None:
    """What is wrong with the export record's file references (``source``, ``quantized_from``), else None:
    rcomp opens the source as a gradient surrogate and reports both."""
    for key in ("source", "quantized_from"):
        ref = info.get(key)
        if ref is None:
            continue
        if not isinstance(ref, dict):
            return f"{key} is not an object"
        if not isinstance(ref.get("path", ""), str):
            return f"{key}.path is not a string"
        sha = ref.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64
                                    and all(c in "0123456789abcdef" for c in sha)):
            return f"{key}.sha256 is not a sha256 hex digest"
        size = ref.get("size_bytes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            return f"{key}.size_bytes is not a byte count"
    return None


def _graph_checks(proto, meta: CheckpointMeta, where: str) -> None:
    """The graph takes (N, C, H, W) of the recorded input spec and gives (N, classes) logits."""
    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise RcompError(f"{where} has {len(inputs)} inputs and {len(proto.graph.output)} outputs; rcomp runs "
                         "classifiers with one image input and one logits output")
    got, want = dims(inputs[0]), [None, *meta.input.shape]
    if len(got) != 4 or any(g is not None and g != w for g, w in zip(got[1:], want[1:], strict=True)):
        raise RcompError(f"{where}: its graph input has shape {got} but its metadata says images of "
                         f"{'x'.join(map(str, meta.input.shape))}; re-export it with rcomp export")
    out = dims(proto.graph.output[0])
    if len(out) != 2 or (out[1] is not None and out[1] != meta.num_classes):
        raise RcompError(f"{where}: its graph output has shape {out} but its metadata says {meta.num_classes} "
                         "classes; re-export it with rcomp export")


def param_count(proto) -> int:
    """Weights stored in the file (float and integer initializers; scales and zero points excluded)."""
    from onnx import TensorProto

    n = 0
    for t in proto.graph.initializer:
        if "normalize" in t.name:  # the mean and std buffers, not weights
            continue
        if t.data_type in (TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT16) \
                and len(t.dims) >= 2:
            size = 1
            for d in t.dims:
                size *= d
            n += size
        elif t.data_type in (TensorProto.FLOAT, TensorProto.INT32) and len(t.dims) == 1 and not t.name.endswith(("scale", "zero_point")):
            n += t.dims[0]
    return n



def describe_onnx(path: Path) -> dict[str, Any]:
    """What ``rcomp info`` reports about an ONNX file written by rcomp export."""
    from rcomp.io.header import sha256_file

    data, proto, props = read_model(Path(path))
    where = printable(str(path))
    meta, info = meta_of(props, where)
    _graph_checks(proto, meta, where)
    comp = meta.compression
    return {
        "path": str(path), "sha256": sha256_file(path), "size_bytes": len(data), "format_version": "onnx",
        "arch": meta.arch.name, "arch_kwargs": meta.arch.kwargs,
        "input": {"shape": list(meta.input.shape), "range": meta.input.range, "mean": meta.input.mean,
                  "std": meta.input.std},
        "num_classes": meta.num_classes, "class_names": meta.class_names, "dataset": meta.dataset,
        "params": param_count(proto), "tensors": len(proto.graph.initializer),
        "pruned": bool(comp.get("pruning") or comp.get("structure")), "pruning": comp.get("pruning"),
        "layers": comp.get("structure", {}), "quantization": comp.get("quantization"), "history": meta.history,
        "onnx": {"opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
                 **{k: v for k, v in info.items() if k in ("exporter", "source", "parity", "quantized_from")}},
    }
