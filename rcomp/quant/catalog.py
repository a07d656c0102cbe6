"""The quantization modes and backends, listed once (no torch).

A mode is what ``compression["quantization"]["mode"]`` of a checkpoint says and what
``rcomp quantize`` makes: ``int8`` (real int8 kernels) or ``simulated`` (fake-quant at 2..16 bits).
Every module that treats the modes differently asks this catalogue (:func:`is_real`,
:func:`label`, the entry's ``extra``), so a new scheme is one entry here plus its code.
"""

from __future__ import annotations

from typing import Any

from rcomp.catalog import Catalogue, Entry

#: the int8 backends: backend -> (torch.ao's backend config, which also shapes the fake-quant twin; activations
#: in [0, 127] (reduce_range, against int16 overflow on CPUs without VNNI) for real int8; the runtime that
#: runs the int8 model: torch.ao's quantized engines (deprecated, kept to load the files they wrote) or
#: the pt2e runtime on oneDNN's int8 kernels (rcomp.quant.pt2e; same twin and file layout as x86))
BACKEND_INFO = {
    "x86": ("torch.ao.quantization.backend_config.x86:get_x86_backend_config", True, "torch.ao"),
    "fbgemm": ("torch.ao.quantization.backend_config:get_fbgemm_backend_config", True, "torch.ao"),
    "qnnpack": ("torch.ao.quantization.backend_config:get_qnnpack_backend_config", False, "torch.ao"),
    "pt2e": ("torch.ao.quantization.backend_config.x86:get_x86_backend_config", True, "pt2e"),
}
BACKENDS = tuple(BACKEND_INFO)
#: the runtime names (third field above)
TORCH_AO, PT2E = "torch.ao", "pt2e"
#: the quantize stage's --backend: torch.ao's engines, plus ONNX Runtime (static QDQ int8 of an ONNX file,
#: written as .onnx; rcomp.stages.export)
ONNXRUNTIME = "onnxruntime"
QUANTIZE_BACKENDS = (*BACKENDS, ONNXRUNTIME)

MODES = Catalogue("quantization mode", [
    Entry("int8", "rcomp.quant.backend:convert",
          "real int8: static post-training quantization (fake-quant twin calibrated with torch.ao FX), run on "
          "CPU int8 kernels: torch.ao's engines (x86, fbgemm, qnnpack) or the pt2e runtime on oneDNN's int8 "
          "kernels (pt2e); gradients from the fake-quant twin", "Jacob et al., CVPR 2018",
          takes=("bits", "backend", "calib_n"),
          extra={"real": True, "bits": (8,), "suffix": "int8", "label": "int{bits} {backend}", "what": "int8",
                 "gradient": "fake-quant twin of int8", "select": "--bits 8"}),
    Entry("simulated", "rcomp.quant.backend:prepare",
          "fake-quant model: fp32 compute carrying the rounding of --bits, differentiable (straight-through)",
          "Thorsteinsson et al., arXiv 2403.09441 (2024)",
          takes=("bits", "backend", "calib_n"),
          extra={"real": False, "bits": tuple(range(2, 17)), "suffix": "sim{bits}", "label": "sim{bits}",
                 "what": "simulated int{bits}", "select": "--simulate --bits 2..16"}),
], flag="--simulate")

INT8, SIMULATED = MODES.builtin_names()


def mode_for(simulate: bool) -> str:
    """The mode ``rcomp quantize`` makes: ``--simulate`` or not."""
    return SIMULATED if simulate else INT8


def runtime(backend: str) -> str:
    """Which runtime runs a real int8 model of ``backend``: ``torch.ao`` or ``pt2e``."""
    return BACKEND_INFO[backend][2]


def is_real(q: dict[str, Any] | str | None) -> bool:
    """Whether a quantization record (or mode name) runs on real integer kernels."""
    mode = q.get("mode") if isinstance(q, dict) else q
    return mode in MODES.builtin and bool(MODES.builtin[mode].get("real"))


def bits_of(mode: str) -> tuple[int, ...]:
    return tuple(MODES.get(mode).get("bits"))


def label(q: dict[str, Any] | None) -> str:
    """``-`` for a float model, else ``int8 x86`` or ``sim4``."""
    if not q:
        return "-"
    entry = MODES.builtin.get(q.get("mode"))
    fmt = entry.get("label") if entry else "int{bits} {backend}"
    return fmt.format(bits=q.get("bits"), backend=q.get("backend", "")).strip()


def supported() -> str:
    """``real int8: --bits 8; simulated: --simulate --bits 2..16``."""
    return "; ".join(f"{'real ' if e.get('real') else ''}{e.name}: {e.get('select')}"
                     for e in MODES.entries(plugins=False))
