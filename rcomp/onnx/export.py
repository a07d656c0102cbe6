"""A Classifier -> ONNX bytes, and the parity check that decides whether the file may be published.

Exporters (measured on a loaded 2-core AMD EPYC, AVX2, torch 2.14.1; see docs/export.md):

* ``dynamo`` (default): ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter
  that torch maintains; 5 s for convnet8, 12-23 s for resnet18-cifar here.
* ``legacy``: the TorchScript-based exporter, 0.3 s / 1.4 s here, but deprecated by torch
  (it warns that it will be removed); offered for speed, parity-checked the same way.

Both write opset :data:`OPSET` with a dynamic batch axis (input ``images`` (N, C, H, W) in [0, 1],
normalisation inside the graph; output ``logits`` (N, classes)).

What exports: float models, pruned models, and simulated (fake-quant) models -- their fake-quant
modules are replaced by the same rounding written as plain fp32 arithmetic
(``(clamp(round(x / s) + z, qmin, qmax) - z) * s``), which both exporters handle and which
reproduces the fake-quant outputs exactly. torch.ao real int8 models are refused by the export stage
(:data:`INT8_REFUSAL`; which modes are real integer ones is the quantization catalogue's to say).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Any

import torch
from torch import nn

from rcomp.errors import RcompError
from rcomp.signals import reraise_interrupt
from rcomp.text import printable

OPSET = 18
EXPORTERS = ("dynamo", "legacy")
INPUT_NAME, OUTPUT_NAME = "images", "logits"

INT8_REFUSAL = (
    "{name} is a {why}; export the float "
    "checkpoint it was quantized from and quantize the ONNX file instead: rcomp export FLOAT.safetensors -o "
    "model.onnx && rcomp quantize model.onnx --backend onnxruntime --data DATA")
#: why, by int8 runtime (quantization catalogue's runtime names)
INT8_WHY = {
    "torch.ao": ("torch.ao int8 checkpoint, which cannot be exported faithfully (torch.export and the dynamo "
                 "exporter fail on its packed weights; the legacy exporter writes a QDQ graph whose logits differ by "
                 "up to 0.32, top-1 agreement 98.4%, so the file would not be the model rcomp measured)"),
    "pt2e": ("pt2e int8 checkpoint, which rcomp does not export (its int8 graph runs on oneDNN kernels that have no "
             "ONNX form)"),
}


class _ExportFakeQuant(nn.Module):
    """A fixed fake-quant as plain fp32 ops: the rounding of torch.ao's FakeQuantize, exportable."""

    def __init__(self, fq: nn.Module):
        super().__init__()
        scale = fq.scale.detach().float().clone()
        zp = fq.zero_point.detach().float().clone()
        self.per_channel = scale.numel() > 1 or fq.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.axis = int(getattr(fq, "ch_axis", 0))
        self.register_buffer("scale", scale)
        self.register_buffer("zp", zp)
        self.qmin, self.qmax = float(fq.quant_min), float(fq.quant_max)
        self.enabled = bool(int(fq.fake_quant_enabled[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s, z = self.scale, self.zp
        if self.per_channel:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            s, z = s.view(shape), z.view(shape)
        return (torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax) - z) * s


def exportable(model) -> nn.Module:
    """``model`` itself, or for a model with fake-quant modules (simulated quantization) a copy whose
    fake-quant modules are plain arithmetic."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    if not any(isinstance(m, FakeQuantizeBase) for m in model.modules()):
        return model
    out = copy.deepcopy(model)

    def swap(mod: nn.Module) -> None:
        for cname, child in list(mod.named_children()):
            if isinstance(child, FakeQuantizeBase):
                setattr(mod, cname, _ExportFakeQuant(child))
            else:
                swap(child)

    swap(out)
    return out.eval()


def to_onnx(model, exporter: str = "dynamo", opset: int = OPSET) -> bytes:
    """ONNX bytes of ``model`` (a Classifier over [0, 1] images) with a dynamic batch axis."""
    from rcomp.onnx.deps import require

    if exporter not in EXPORTERS:
        raise RcompError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    require("rcomp export", ("onnx", "onnxruntime", "onnxscript") if exporter == "dynamo" else ("onnx", "onnxruntime"))
    net = exportable(model).cpu().eval()
    example = torch.rand(2, *model.meta.input.shape, generator=torch.Generator().manual_seed(0))
    try:
        if exporter == "dynamo":
            with warnings.catch_warnings():  # onnxscript's optimizer chatters about unclosed files and opsets
                warnings.simplefilter("ignore", ResourceWarning)
                prog = torch.onnx.export(net, (example,), dynamo=True, opset_version=opset, verbose=False,
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                         dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1 << 20)}})
            return prog.model_proto.SerializeToString()
        buf = io.BytesIO()
        torch.onnx.export(net, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return buf.getvalue()
    except RcompError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter's own failure, in one line
        reraise_interrupt(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise RcompError(f"the {exporter} exporter failed on {printable(model.meta.arch.name)} ({type(exc).__name__}: "
                         f"{printable(first, 160)}); try --exporter {other}") from None


def with_metadata(data: bytes, props: dict[str, str]) -> bytes:
    """``data`` with its ``metadata_props`` replaced by ``props`` (keys sorted: stable bytes)."""
    import onnx

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    for k in sorted(props):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, props[k]
    proto.producer_name = "rcomp"
    return proto.SerializeToString()


def metadata_props(meta, info: dict[str, Any]) -> dict[str, str]:
    """The checkpoint's ``rcomp.*`` metadata (input spec, classes, compression, history, stats) plus
    ``rcomp.onnx`` (source checkpoint path and sha256, exporter, opset, parity)."""
    from rcomp.onnx.runtime import ONNX_KEY

    props = meta.to_metadata()
    props[ONNX_KEY] = json.dumps(info, sort_keys=True)
    return props


def parity_inputs(model, data: str | None, data_dir, n: int, batch_size: int, seed: int, log):
    """Held-out images for the parity check: ``data``'s test split, or the recorded dataset's, or seeded
    random [0, 1] inputs when there is none; returns ``(batches, description)`` and says which on ``log``."""
    name = data or model.meta.dataset
    if name:
        from rcomp.data.registry import get_dataset, make_loader

        ds = get_dataset(name, "test", model.meta.input, data_dir, seed=seed, log=log)
        batches = [x for x, _ in make_loader(ds, batch_size, n=n)]
        got = sum(len(x) for x in batches)
        how = "--data" if data else "the dataset the checkpoint records"
        desc = f"{got} {name} test images ({how})"
    else:
        g = torch.Generator().manual_seed(seed)
        batches = [torch.rand(min(batch_size, n - s), *model.meta.input.shape, generator=g)
                   for s in range(0, n, batch_size)]
        desc = f"{n} seeded random [0, 1] inputs (seed {seed}; no --data given and the checkpoint records no dataset)"
    log(f"parity check on {desc}")
    return batches, desc


@torch.inference_mode()
def parity(model, onnx_model, batches) -> dict[str, Any]:
    """Max abs logit difference and top-1 agreement of ``onnx_model`` against ``model`` on ``batches``."""
    n = agree = 0
    diff = 0.0
    for x in batches:
        ref = model(x).float()
        got = onnx_model(x).float()
        diff = max(diff, float((ref - got).abs().max())) if len(x) else diff
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        n += len(x)
    return {"n": n, "max_abs_diff": diff, "top1_agreement": agree / n if n else 0.0}
