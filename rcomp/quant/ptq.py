"""Post-training quantization of a Classifier: real int8 or simulated 2..16 bits.

Only ``model.net`` is quantized; the normalisation in front stays fp32. Calibration follows
static post-training quantization (Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference"): MinMax ranges of every activation on
a few calibration batches, weights symmetric per output channel, activations affine per tensor,
BatchNorm folded into the convolutions. Simulated (fake-quant) models compute in fp32 but carry
the rounding of the low-bit model, as in Thorsteinsson et al. (2024, arXiv 2403.09441).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

from rcomp.errors import RcompError
from rcomp.quant import backend as qb
from rcomp.quant import catalog as qc
from rcomp.quant.assemble import assemble, finalize, quant_meta


def check_bits(bits: Any, simulate: bool) -> int:
    """``bits`` (an int) checked, or a one-line error listing what is supported."""
    supported = qc.supported()
    if isinstance(bits, bool) or not isinstance(bits, int):  # text is parsed at the boundary (options)
        raise RcompError(f"--bits {bits!r} is not an integer; supported: {supported}")
    b = bits
    if simulate and b not in qb.SIM_BITS:
        raise RcompError(f"--bits {b} is not supported; supported: {supported}")
    if not simulate and b not in qb.REAL_BITS:
        hint = " (add --simulate for a fake-quant model)" if b in qb.SIM_BITS else ""
        raise RcompError(f"--bits {b} is not supported without --simulate{hint}; supported: {supported}")
    return b


def float_shapes(model, structure: dict) -> dict[str, list[int]]:
    """Shapes of the parameters and buffers of the resized (pruned) modules, to rebuild them on load."""
    out = {}
    modules = dict(model.net.named_modules())
    for name in structure:
        mod = modules[name]
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            out[f"{name}.{pname}" if name else pname] = list(t.shape)
    return out


def trace(model):
    """``model.net`` traced with torch.fx and BatchNorm-folded, on the CPU: a network FX cannot trace
    (control flow on tensor values, as in timm's mobilevit or crossvit) is refused here, so a caller can
    check before it loads any calibration data; pass the result to :func:`quantize` as ``folded``."""
    return qb.fold_batchnorm(model.net).cpu()


def default_backend(simulate: bool, log=None) -> str:
    """The backend when none is named: pt2e (oneDNN's int8 kernels) for real int8, x86 for a simulated model (its
    fake-quant twin follows x86's ranges; a simulated model has no int8 runtime). A torch build without oneDNN's
    int8 kernels gets torch.ao's x86 engine (qnnpack where there is no x86 engine), said through ``log``."""
    if simulate:
        return "x86"
    from rcomp.quant.pt2e import Pt2eUnsupported, require_onednn

    try:
        require_onednn()
        return "pt2e"
    except Pt2eUnsupported:
        fallback = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
        if log is not None:
            log(f"this torch build has no oneDNN int8 kernels (the default pt2e runtime): writing a torch.ao "
                f"{fallback} int8 file instead (deprecated runtime; docs/quantization.md)")
        return fallback


def quantize(model, calib: Iterable[torch.Tensor], *, bits: int = 8, simulate: bool = False,
             backend: str | None = None, folded=None, log=None):
    """Quantize ``model`` (a float Classifier); returns a new Classifier, ``model`` is unchanged.

    ``calib``: batches of [0, 1] images (labels not needed). ``bits=8`` without ``simulate``
    gives a real int8 model on ``backend``'s kernels (CPU), with its fake-quant twin attached as
    gradient surrogate; ``simulate=True`` gives a fake-quant model at ``bits`` (2..16).
    ``backend=None``: :func:`default_backend` (pt2e for real int8); where the pt2e runtime cannot take the
    network (a 1-d convolution, an activation quantized per channel), a torch.ao x86 model instead, said
    through ``log`` (a callable taking one line) every time.
    ``folded``: :func:`trace` of ``model`` when the caller checked it already (it is used up).
    """
    from rcomp.models.structure import structure_diff
    from rcomp.quant.pt2e import Pt2eUnsupported

    if model.is_quantized:
        raise RcompError("the model is already quantized; quantize the float checkpoint instead")
    bits = check_bits(bits, simulate)
    defaulted = backend is None
    if defaulted:
        backend = default_backend(simulate, log)
    qb.check_backend(backend)
    if simulate and qc.runtime(backend) == qc.PT2E:
        raise RcompError("--backend pt2e makes real int8 models only; drop --simulate, or simulate with --backend x86")
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device, mode and metadata
    structure = structure_diff(model)
    if structure:
        model.meta.compression["structure"] = structure
    else:
        model.meta.compression.pop("structure", None)
    mode = qc.mode_for(simulate)
    batches = [model.normalize(x.cpu().float()) for x in calib]
    if not batches:
        raise RcompError("no calibration images; give --calib-n of at least 1")
    fq = qb.prepare(model.net, batches[0][:1], bits, backend, real=not simulate, folded=folded)
    n = qb.calibrate(fq, batches)
    q = quant_meta(mode, bits, backend, n)
    if structure:
        q["float_shapes"] = float_shapes(model, structure)
    try:
        return assemble(model, finalize(fq, q), q)
    except Pt2eUnsupported as exc:
        if not defaulted:
            raise
        # the same twin (pt2e's follows x86's configuration), now converted by torch.ao
        q["backend"] = "x86"
        if log is not None:
            log(f"{exc.reason}: writing a torch.ao x86 int8 file instead (deprecated runtime; docs/quantization.md)")
        return assemble(model, finalize(fq, q), q)
