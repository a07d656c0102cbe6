"""Quantized checkpoints without pickle: plain tensors in, identical outputs out.

Layout (every name under ``net.`` is the fake-quant twin's state_dict, see
:mod:`rcomp.quant.backend`):

* ``net.<layer>.weight_q``: the integer weights (int8 up to 8 bits, int16 above);
* ``net.<layer>.weight_fake_quant.scale`` / ``.zero_point``: per-channel weight scales (float32)
  and zero points (int32, 0 for the symmetric scheme);
* ``net.activation_post_process_<i>.scale`` / ``.zero_point``, observer min/max: activation ranges;
* biases (float32) and ``normalize.mean`` / ``normalize.std``.

Metadata ``compression["quantization"]`` holds mode, bits, backend and schemes, plus the float
shapes of pruned layers. Loading builds the float architecture, resizes pruned layers, prepares
the same fake-quant twin, loads the tensors, sets weights to ``(q - zero_point) * scale`` and
(for int8) converts again: the same code path as quantizing, hence identical outputs.
"""

from __future__ import annotations

import re

import torch

from rcomp.errors import RcompError
from rcomp.models.loading import with_versions
from rcomp.quant import backend as qb
from rcomp.quant import catalog as qc
from rcomp.quant.assemble import assemble, check_meta, twin_of
from rcomp.text import printable

SUFFIX = ".weight_q"
#: names of a twin's quantizer state (not weights)
_QUANTIZER_STATE = re.compile(r"(^|\.)(activation_post_process_\d+|weight_fake_quant)\.")


def export(model) -> dict[str, torch.Tensor]:
    """Plain tensors for a quantized Classifier; also sets ``meta.stats["params"]``."""
    q = model.meta.compression["quantization"]
    fq = twin_of(model)
    ints = qb.int8_of(model.net, fq, q["backend"]) if qc.is_real(q) else qb.int_weights(fq)
    int_dtype = torch.int8 if q["bits"] <= 8 else torch.int16
    out = {f"normalize.{k}": v.detach().cpu().clone().contiguous() for k, v in model.normalize.state_dict().items()}
    for key, t in fq.state_dict().items():
        name, _, leaf = key.rpartition(".")
        if leaf == "weight" and name in ints:
            out[f"net.{name}{SUFFIX}"] = ints[name].to(int_dtype).cpu().contiguous()
        else:
            out[f"net.{key}"] = t.detach().cpu().clone().contiguous()
    model.meta.stats["params"] = sum(p.numel() for p in fq.parameters())
    return out


def _resize(net, shapes: dict[str, list[int]], where: str) -> None:
    modules = dict(net.named_modules())
    for key, shape in shapes.items():
        mname, _, pname = key.rpartition(".")
        mod = modules.get(mname)
        if mod is None or not (pname in mod._parameters or pname in mod._buffers):
            raise RcompError(f"{where}: quantization metadata names {printable(repr(key), 80)}, which the architecture does not have")
        fill = torch.ones if pname in ("running_var", "weight") else torch.zeros
        old = getattr(mod, pname)
        new = fill(shape, dtype=old.dtype)
        if pname in mod._parameters:
            mod._parameters[pname] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            mod._buffers[pname] = new


def check_scales(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every quantization scale is a finite positive number: zero, negative or NaN scales are refused.

    Shapes too: a layer's weight scales and zero points hold one value per output channel of its
    integer weights (``.weight_q``), an activation's one value (or one per channel, with as many zero
    points); anything else is refused here, before
    torch's own shape errors could reach the user."""
    for key, t in tensors.items():
        if key.endswith(".scale") and t.is_floating_point() and not bool(((t > 0) & torch.isfinite(t)).all()):
            raise RcompError(f"{where}: quantization scale {printable(key)} holds zero, negative or NaN values; "
                             "the file is damaged or edited: re-quantize the float checkpoint")
        leaf = key.rpartition(".")[2]
        if leaf not in ("scale", "zero_point"):
            continue
        owner = key[: -len(leaf) - 1]
        if owner.endswith(".weight_fake_quant"):
            q = tensors.get(owner[: -len(".weight_fake_quant")] + SUFFIX)
            want = (q.shape[0],) if q is not None and q.dim() >= 1 else None
        else:  # an activation: one value per tensor, or per channel where FX observes one (timm mobilenetv3)
            pair = tensors.get(owner + (".zero_point" if leaf == "scale" else ".scale"))
            want = (1,) if t.dim() != 1 or pair is None or tuple(pair.shape) != tuple(t.shape) else None
        if want is not None and tuple(t.shape) != want:
            raise RcompError(f"{where}: quantization {leaf} {printable(key, 120)} has shape {tuple(t.shape)}, but "
                             f"its layer needs {want}; the file is damaged or edited: re-quantize the float "
                             "checkpoint")


def fit_problem(expected: dict[str, torch.Size | None], found: dict[str, torch.Size]) -> str | None:
    """What keeps the file's tensors (``found``: name -> shape) from the architecture's (``expected``; None: any
    shape), in the file's own names: missing, unexpected, or of another shape; None when they fit."""
    def some(keys: list[str]) -> str:
        return printable(", ".join(sorted(keys)[:3]), 160) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shaped = [k for k in expected if k in found and expected[k] is not None and tuple(found[k]) != tuple(expected[k])]
    parts = [f"missing {some(missing)}" if missing else "", f"unexpected {some(unexpected)}" if unexpected else ""]
    if shaped:
        k = sorted(shaped)[0]
        parts.append(f"{printable(k, 100)} has shape {tuple(found[k])}, the architecture {tuple(expected[k])}"
                     + (f" (and {len(shaped) - 1} more of another shape)" if len(shaped) > 1 else ""))
    return "; ".join(p for p in parts if p) or None


def restore(model, tensors: dict[str, torch.Tensor], where: str = "checkpoint"):
    """Rebuild the quantized Classifier from the float skeleton ``model`` and the stored tensors."""
    q = check_meta(model.meta.compression.get("quantization"), where)
    check_scales(tensors, where)
    if qc.is_real(q) and qc.runtime(q["backend"]) == qc.PT2E:
        from rcomp.quant.pt2e import require_onednn

        try:
            require_onednn()
        except RcompError:
            raise RcompError(f"{where}: this int8 file runs on the pt2e backend (oneDNN int8 kernels), which this "
                             "torch build lacks; on such a machine re-quantize the float checkpoint with "
                             "--backend qnnpack") from None
    qb.check_backend(q["backend"])
    _resize(model.net, q.get("float_shapes", {}), where)
    norm = {k: v for k, v in tensors.items() if k.startswith("normalize.")}
    bad = fit_problem({f"normalize.{k}": v.shape for k, v in model.normalize.state_dict().items()},
                      {k: v.shape for k, v in norm.items()})
    if bad:
        raise RcompError(f"{where}: the normalisation tensors do not fit its recorded input "
                         f"{'x'.join(map(str, model.meta.input.shape))} ({bad}); the file is damaged or edited")
    model.normalize.load_state_dict({k[len("normalize."):]: v for k, v in norm.items()})
    spec = model.meta.input
    fq = qb.prepare(model.net, torch.zeros(1, *spec.shape), q["bits"], q["backend"], real=qc.is_real(q))
    state, ints = {}, {}
    for key, t in tensors.items():
        if not key.startswith("net."):
            continue
        key = key[len("net."):]
        if key.endswith(SUFFIX):
            name = key[: -len(SUFFIX)]
            ints[name] = t.to(torch.int64)
            state[f"{name}.weight"] = torch.zeros(t.shape, dtype=torch.float32)
        else:
            state[key] = t
    ref = fq.state_dict()
    wq = set(qb.weight_quantizers(fq))
    # quantizer state (scales, zero points, observed ranges) takes its shape from the file when torch.ao loads it;
    # check_scales has judged those shapes
    expected = {f"net.{k[:-len('.weight')]}{SUFFIX}" if k.endswith(".weight") and k[:-len(".weight")] in wq
                else f"net.{k}": None if _QUANTIZER_STATE.search(k) else v.shape for k, v in ref.items()}
    found = {k: t.shape for k, t in tensors.items() if not k.startswith("normalize.")}
    bad = fit_problem(expected, found)
    if bad:
        raise RcompError(f"{where}: the quantized tensors do not fit architecture {printable(model.meta.arch.name)} "
                         f"({bad}); the file is damaged or edited: re-quantize the float checkpoint")
    try:
        fq.load_state_dict(with_versions(state, ref), strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:200]
        raise RcompError(f"{where}: the quantized tensors do not fit architecture {model.meta.arch.name}: {msg}") from None
    if set(ints) != set(qb.weight_quantizers(fq)):
        raise RcompError(f"{where}: integer weights are missing for some layers; the file is damaged")
    bad = qb.outside_range(fq, ints)
    if bad:
        raise RcompError(f"{where}: {bad}; the file is damaged or edited: re-quantize the float checkpoint")
    qb.set_int_weights(fq, ints)
    qb.freeze(fq)
    return assemble(model, fq, q)
