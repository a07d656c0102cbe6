"""ONNX Runtime static int8 quantization (QDQ), with the activation type chosen for this CPU.

``onnxruntime.quantization.quantize_static``: QDQ format, weights int8 symmetric per output
channel, activations per tensor, MinMax ranges from calibration images.

The activation type (:func:`choose_activation`), measured on an AMD EPYC with AVX2 and no VNNI
(onnxruntime 1.32, resnet18-cifar, batch 64; docs/export.md):

* U8S8 with ``reduce_range`` (7-bit weights) where x86 has no VNNI: 3.0-3.1x eager fp32 here (the
  issue measured 3.6x against a slower eager run) and accuracy kept. Without ``reduce_range`` the u8*s8 pairs overflow the 16-bit intermediate sums of the AVX2
  kernels (logits off by up to 3.2); S8S8 kept accuracy but ran at 1.3x, slower than ORT fp32.
* U8S8 without ``reduce_range`` where x86 has VNNI (avx512_vnni or avx_vnni): VNNI accumulates in
  32 bits, so the overflow does not arise and full-range weights are free. This choice follows
  onnxruntime's documentation; it was not measured in this session (no VNNI CPU here).
* S8S8 elsewhere (ARM and other CPUs): onnxruntime's default; not measured here.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError
from rcomp.signals import reraise_interrupt
from rcomp.text import printable

ACTIVATIONS = ("u8s8-reduce-range", "u8s8", "s8s8")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_activation(flags: set[str] | None = None, machine: str | None = None) -> tuple[str, str]:
    """``(activation type, reason)`` for this CPU (see the module docstring)."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        vnni = sorted(f for f in ("avx512_vnni", "avx_vnni") if f in flags)
        if vnni:
            return "u8s8", f"x86 with VNNI ({', '.join(vnni)}): U8S8 with full-range weights"
        return ("u8s8-reduce-range", "x86 without VNNI: U8S8 with reduce_range (7-bit weights), the fast and accurate "
                "choice measured on AVX2; S8S8 is slow there and U8S8 without reduce_range overflows")
    return "s8s8", f"{machine}: S8S8 (onnxruntime's default; not measured by rcomp on this CPU type)"


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of image batches."""

    def __init__(self, name: str, batches):
        self.name = name
        self._it = iter([b.detach().cpu().float().contiguous().numpy() for b in batches])

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self.name: x}

    def rewind(self):  # pragma: no cover - not used by MinMax
        pass


def quantize_static(data: bytes, calib_batches, activation: str) -> bytes:
    """QDQ int8 of the fp32 ONNX model ``data``, calibrated on ``calib_batches`` ([0, 1] images)."""
    from rcomp.onnx.deps import require

    require("ONNX Runtime quantization")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize

    if activation not in ACTIVATIONS:
        raise RcompError(f"activation type {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    proto = onnx.load_from_string(data)
    inits = {i.name for i in proto.graph.initializer}
    name = next(i.name for i in proto.graph.input if i.name not in inits)
    act = QuantType.QInt8 if activation == "s8s8" else QuantType.QUInt8
    if unshare_initializers(proto):
        data = proto.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="rcomp-ortq-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        try:
            with _quiet_preprocess_advice():
                ort_quantize(str(src), str(dst), _Reader(name, calib_batches), quant_format=QuantFormat.QDQ,
                             per_channel=True, reduce_range=activation == "u8s8-reduce-range", activation_type=act,
                             weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
            reraise_interrupt(exc)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RcompError(f"onnxruntime could not quantize this model ({type(exc).__name__}: "
                             f"{printable(first, 160)})") from None
        return dst.read_bytes()


def unshare_initializers(proto) -> int:
    """Give every ``Identity(initializer)`` output its own initializer (in place); returns how many.

    The legacy exporter stores equal tensors once and hands them to each user through an Identity
    node (e.g. the all-zero biases of freshly folded BatchNorms: 16 of resnet18-cifar's 20
    convolutions). onnxruntime's quantizer then leaves every layer whose bias is not an initializer
    in float ("Expected bias ... to be an initializer"): an int8 file at 1.5x eager fp32 instead of
    3x, with nothing said."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    keep, n = [], 0
    for node in g.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits \
                and node.output[0] not in outputs:
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0]))
            n += 1
        else:
            keep.append(node)
    if n:
        del g.node[:]
        g.node.extend(keep)
    return n


def float_layers(data: bytes) -> tuple[list[str], int]:
    """``(names of the Conv/Gemm/MatMul layers left in float, count of all)`` in an ONNX Runtime QDQ file.

    A layer runs on int8 kernels only when its input and weight, and its bias where it has one, come
    from DequantizeLinear nodes (onnxruntime then fuses it into QLinearConv/QGemm); otherwise it stays
    an fp32 layer on dequantized values."""
    import onnx

    g = onnx.load_from_string(data).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    layers = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1]
    left = [n.name or n.output[0] for n in layers
            if any(made_by.get(i) != "DequantizeLinear" for i in list(n.input)[:3] if i)]
    return left, len(layers)


class _DropAdvice:
    """Drops onnxruntime's 'Please consider to run pre-processing' log lines (the exported graph is already
    optimised by the exporter, and pre-processing (symbolic shape inference) cost 9 s on convnet8 here) and
    its notes on layers it leaves in float (said in one line by the quantize stage: :func:`float_layers`)."""

    def filter(self, record) -> bool:
        text = str(record.getMessage())
        return not any(k in text for k in ("pre-processing", "to be an initializer", "is not constant"))


@contextlib.contextmanager
def _quiet_preprocess_advice():
    root = logging.getLogger()
    f = _DropAdvice()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def quant_record(activation: str, reason: str, calib_n: int, data: str) -> dict[str, Any]:
    """What ``compression["quantization"]`` holds for an ONNX Runtime int8 file."""
    return {"mode": "onnxruntime-qdq", "bits": 8, "backend": "onnxruntime", "format": "QDQ",
            "activation_type": activation, "reason": reason,
            "weight_scheme": "symmetric per-channel int8" + (" (7-bit range, reduce_range)"
                                                             if activation == "u8s8-reduce-range" else ""),
            "activation_scheme": f"affine per-tensor {'int8' if activation == 's8s8' else 'uint8'}",
            "observer": "minmax", "calib_n": calib_n, "calib_data": data}
