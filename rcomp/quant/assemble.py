"""Build the quantized Classifier from a frozen fake-quant twin, the same way every time.

Quantizing, loading a checkpoint and ending quantization-aware fine-tuning all go through
:func:`finalize` then :func:`assemble`, so a model in memory and the same model reloaded from
its file compute identical outputs.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from rcomp.errors import RcompError
from rcomp.quant import backend as qb
from rcomp.quant import catalog as qc
from rcomp.text import printable

MODES = qc.MODES.builtin_names()


def quant_meta(mode: str, bits: int, backend: str, calib_n: int, **extra: Any) -> dict[str, Any]:
    """What ``compression["quantization"]`` holds (``rcomp info`` prints the scalar fields)."""
    r = qb.ranges(bits, backend, real=qc.is_real(mode))
    return {
        "mode": mode, "bits": bits, "backend": backend,
        "weight_scheme": f"symmetric per-channel int{bits} [{r['w_min']}, {r['w_max']}]",
        "activation_scheme": f"affine per-tensor uint{bits} [{r['act_min']}, {r['act_max']}]",
        "observer": "minmax", "batchnorm": "folded", "calib_n": calib_n, **extra,
    }


def check_meta(q: Any, where: str) -> dict[str, Any]:
    """Validate a stored ``compression["quantization"]`` record."""
    if not isinstance(q, dict):
        raise RcompError(f"{where}: compression.quantization must be an object")
    mode, bits, backend = q.get("mode"), q.get("bits"), q.get("backend")
    if mode not in MODES:
        raise RcompError(f"{where}: unknown quantization mode {printable(repr(mode), 40)} (this rcomp reads {', '.join(MODES)})")
    ok_bits = qc.bits_of(mode)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in ok_bits:
        raise RcompError(f"{where}: quantization bits {printable(repr(bits), 40)} is invalid for mode {mode}")
    if backend not in qb.BACKENDS:
        raise RcompError(f"{where}: unknown quantization backend {printable(repr(backend), 40)}")
    shapes = q.get("float_shapes", {})
    if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in v) for v in shapes.values()):
        raise RcompError(f"{where}: compression.quantization.float_shapes is malformed")
    return q


def finalize(fq: nn.Module, q: dict[str, Any]) -> nn.Module:
    """Freeze ``fq`` and replace its float weights by their integer values times the scales."""
    qb.freeze(fq)
    if qc.is_real(q) and qc.runtime(q["backend"]) == qc.PT2E:
        qb.set_int_weights(fq, qb.int_weights(fq))  # the pt2e graph is built from the twin's own rounding
    elif qc.is_real(q):
        qb.set_int_weights(fq, qb.int8_weights(qb.convert(fq, q["backend"])))
    else:
        qb.set_int_weights(fq, qb.int_weights(fq))
    return fq


def assemble(model, fq: nn.Module, q: dict[str, Any]):
    """A new Classifier (meta copied from ``model``) running ``fq`` (simulated) or its int8 conversion."""
    from rcomp.models.wrapper import Classifier
    from rcomp.quant.surrogate import FakeQuantTwin

    meta = copy.deepcopy(model.meta)
    meta.compression["quantization"] = q
    fq.eval()
    if not qc.is_real(q):
        out = Classifier(fq, meta)
    else:
        out = Classifier(qb.convert(fq, q["backend"], tuple(meta.input.shape)), meta)
        twin = FakeQuantTwin(out.normalize, fq, meta)
        twin.gradient_note = qc.MODES.get(q["mode"]).get("gradient")
        out.set_gradient_model(twin)
    out.normalize.load_state_dict(model.normalize.state_dict())
    out.source_path = getattr(model, "source_path", None)
    out.source_sha256 = getattr(model, "source_sha256", None)
    return out.eval()


def twin_of(model) -> nn.Module:
    """The fake-quant network behind a quantized Classifier (its net, or its surrogate's)."""
    q = model.meta.compression.get("quantization") or {}
    if q and not qc.is_real(q):
        return model.net
    sur = model.gradient_model()
    fq = getattr(sur, "fq", None)
    if fq is None:
        raise RcompError("this int8 model has no fake-quant twin attached; load it from its checkpoint "
                         "or quantize it with rcomp.quant.quantize")
    return fq


def with_backend(model, backend: str):
    """The real int8 ``model`` on another int8 runtime, e.g. an int8 file written by torch.ao (x86) run on
    pt2e: the same twin, hence the same integer weights and ranges; ``model`` is unchanged. Saving the
    result writes the same tensors with the new backend in the header."""
    q = dict(model.meta.compression.get("quantization") or {})
    if not qc.is_real(q):
        raise RcompError("with_backend needs a real int8 model; simulated and float models have no int8 runtime")
    qb.check_backend(backend)
    if qc.BACKEND_INFO[backend][1] and not qc.BACKEND_INFO[q["backend"]][1]:  # pt2e's kernels too (x86's twin)
        raise RcompError(f"an int8 model made for {q['backend']} (activations in [0, 255]) cannot move to {backend} "
                         "(activations in [0, 127] against int16 overflow); re-quantize the float checkpoint")
    q["backend"] = backend
    fq = copy.deepcopy(twin_of(model))
    return assemble(model, finalize(fq, q), q)
