"""An exported ONNX file as a model rcomp can measure: :class:`OnnxClassifier`.

The adapter runs ONNX Runtime in ``forward`` (CPU execution provider, no autograd) and carries
``.meta`` (a :class:`~rcomp.io.format.CheckpointMeta`) rebuilt from the file's ``metadata_props``,
so the evaluation loop, latency timing, Square (forward passes only) and replays of saved
examples run on the shipped file itself.

Gradients: an ONNX model has none. Gradient attacks run on a *surrogate* -- the source checkpoint
named in the file's metadata (used only when the user names it with ``--surrogate``, or when it
exists at the recorded path with the recorded sha256), or any checkpoint given with
``--surrogate`` -- and their examples are scored on the ONNX model (transfer). Without one,
``gradient_source`` reads ``none (black-box on the exported model)`` and gradient attacks are
refused before anything runs (:func:`refuse_gradient_attacks`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcomp.errors import RcompError
from rcomp.io.format import CheckpointMeta
from rcomp.signals import reraise_interrupt
from rcomp.text import printable

BLACK_BOX = "none (black-box on the exported model)"


def is_onnx_path(path: Any) -> bool:
    return isinstance(path, (str, Path)) and str(path).lower().endswith(".onnx")


def thread_policy() -> str:
    """How threads wait, as bench reports it: OMP_WAIT_POLICY (torch) and ORT spinning follow it."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() or "default (active spin-wait)"


def make_session(data: bytes, where: str = "ONNX model"):
    """An ONNX Runtime CPU session using as many intra-op threads as torch; no spinning when
    ``OMP_WAIT_POLICY=PASSIVE`` (busy-waiting threads skew timings on a loaded machine)."""
    from rcomp.onnx.deps import require

    require("running an ONNX model")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # rcomp says what went wrong in one line; no coloured [E:onnxruntime:...] lines
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors; one line for the user
        reraise_interrupt(exc)
        raise RcompError(f"onnxruntime cannot run {where} ({ort_reason(exc)}); re-export it with rcomp export") \
            from None


def ort_reason(exc: BaseException, limit: int = 200) -> str:
    """onnxruntime's error text without its machinery: the ``[ONNXRuntimeError] : 1 : FAIL :`` prefix and the
    C++ source location and function signature it puts before the reason."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (?:[\w:<>,*& ]+\((?:[^()]|\([^()]*\))*\)(?: const)? )?", "", text)
    return printable(text.strip() or type(exc).__name__, limit)


class OnnxClassifier(nn.Module):
    """ONNX Runtime behind the Classifier interface: [0, 1] images (N, C, H, W) in, logits out.

    ``forward`` has no autograd: attacks that need gradients use :meth:`gradient_model`, the
    attached surrogate. The module holds no parameters; ``param_count`` and ``macs`` come from
    the file (initializers) and the export record.
    """

    is_onnx = True

    def __init__(self, data: bytes, meta: CheckpointMeta, info: dict[str, Any], where: str = "ONNX model",
                 param_count: int | None = None):
        super().__init__()
        self.meta = meta
        self.onnx_info = info
        self._session = make_session(data, where)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._surrogate: list[nn.Module] = []
        self.surrogate_note: str | None = None
        #: why no surrogate was attached (said with the refusal of gradient attacks, or on stderr)
        self.no_surrogate_reason: str | None = None
        #: which surrogate gradient attacks use, said when one runs (:func:`refuse_gradient_attacks`)
        self.surrogate_message: str | None = None
        self.param_count = param_count
        self.macs = (meta.stats or {}).get("macs")
        self.source_path: Path | None = None
        self.source_sha256: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self._session.run([self._output], {self._input: arr})[0]
        return torch.from_numpy(out).to(x.device)

    # ----- the Classifier interface -----------------------------------------
    def set_gradient_model(self, surrogate: nn.Module | None, note: str | None = None) -> None:
        self._surrogate = [surrogate] if surrogate is not None else []
        self.surrogate_note = note if surrogate is not None else None

    def gradient_model(self) -> nn.Module:
        if not self._surrogate:
            raise RcompError("an ONNX model has no gradients; give --surrogate CKPT (e.g. the checkpoint it was "
                             "exported from) or use a gradient-free attack (--attack square)")
        sur = self._surrogate[0]
        return sur.gradient_model() if hasattr(sur, "gradient_model") else sur

    @property
    def has_surrogate(self) -> bool:
        return bool(self._surrogate)

    @property
    def gradient_source(self) -> str:
        return self.surrogate_note if self._surrogate and self.surrogate_note else BLACK_BOX

    @property
    def is_quantized(self) -> bool:
        return bool(self.meta.compression.get("quantization"))

    def num_parameters(self) -> int:
        return int(self.param_count or 0)


from rcomp.onnx.fileio import (  # noqa: E402,F401 - re-exported: the adapter's file side
    MAX_ONNX_BYTES,
    ONNX_KEY,
    _graph_checks,
    meta_of,
    param_count,
    read_model,
)


def load_onnx(path: str | Path, device: str = "cpu", *, surrogate: str | Path | nn.Module | None = None,
              use_source: bool = True) -> OnnxClassifier:
    """Load an ONNX file written by rcomp as an :class:`OnnxClassifier`; attach a gradient surrogate:
    ``surrogate`` (a checkpoint path the user named), else the recorded source checkpoint if it exists
    at its recorded path (or beside the ONNX file) with the recorded sha256; the graph is probed once
    (:func:`probe`)."""
    from rcomp.io.header import sha256_file

    path = Path(path)
    where = printable(str(path))
    data, proto, props = read_model(path)
    meta, info = meta_of(props, where)
    _graph_checks(proto, meta, where)
    model = OnnxClassifier(data, meta, info, where=where, param_count=param_count(proto))
    probe(model, where)
    model.source_path = path
    model.source_sha256 = sha256_file(path)
    model.eval()
    attach_surrogate(model, surrogate, device, use_source=use_source)
    return model


def probe(model: OnnxClassifier, where: str) -> None:
    """Run the graph once on two black images of the recorded input spec: a graph that cannot take them, or
    whose logits are not (2, classes) and finite, is refused in one line before any figure is made (a graph
    with free dimensions passes the static checks of :func:`_graph_checks`)."""
    c, h, w = model.meta.input.shape
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, c, h, w))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors; one line for the user
        reraise_interrupt(exc)
        raise RcompError(f"{where} does not run on images of {c}x{h}x{w}, the input its metadata records "
                         f"({ort_reason(exc, 160)}); re-export it with rcomp export") from None
    if tuple(out.shape) != (2, model.meta.num_classes):
        raise RcompError(f"{where} gives logits of shape {tuple(out.shape)} for 2 images, but its metadata records "
                         f"{model.meta.num_classes} classes; re-export it with rcomp export")
    if not torch.isfinite(out).all():
        raise RcompError(f"{where} gives non-finite logits (NaN or inf) on black images; the file is damaged or "
                         "its weights are: re-export a checkpoint with finite weights")


def _source_candidates(model: OnnxClassifier) -> list[Path]:
    src = (model.onnx_info.get("source") or {})
    p = src.get("path")
    if not isinstance(p, str) or not p:
        return []
    cands = [Path(p)]
    if model.source_path is not None:
        beside = Path(model.source_path).parent / Path(p).name
        if beside.resolve() != Path(p).resolve():
            cands.append(beside)
    return cands


def attach_surrogate(model: OnnxClassifier, surrogate: str | Path | nn.Module | None, device: str = "cpu", *,
                     use_source: bool = True) -> None:
    """Attach the checkpoint whose gradients attacks use (see :func:`load_onnx`); record which
    (``surrogate_message``, said when a gradient attack runs) or why none (``no_surrogate_reason``)."""
    from rcomp.io.header import sha256_file
    from rcomp.models.loading import load

    src = model.onnx_info.get("source") or {}
    want_sha = src.get("sha256") if isinstance(src.get("sha256"), str) else None
    if surrogate is not None:
        if isinstance(surrogate, nn.Module):  # the Python API: a loaded model
            if not hasattr(surrogate, "meta"):
                raise RcompError("surrogate: give a checkpoint path or a model loaded with rcomp.load")
            sur, shown = surrogate, f"the given {printable(surrogate.meta.arch.name)} model"
            label = shown
        else:
            if is_onnx_path(surrogate):
                raise RcompError(f"--surrogate {printable(str(surrogate))} is an ONNX file, which has no gradients "
                                 "either; give the checkpoint (.safetensors) it was exported from")
            sur, shown = load(Path(surrogate), device=device), printable(str(surrogate))
            label = printable(Path(surrogate).name)
        if getattr(sur, "is_onnx", False):
            raise RcompError("surrogate: an ONNX model has no gradients; give a checkpoint")
        _check_compatible(model, sur, shown)
        sha = getattr(sur, "source_sha256", None)
        same = " (the source checkpoint: sha256 matches the export record)" if sha and sha == want_sha else ""
        model.set_gradient_model(sur, f"surrogate {label} (--surrogate{', sha256 ' + sha[:12] if sha else ''}), "
                                      "scored on the exported model")
        model.surrogate_message = (f"gradient attacks run on --surrogate {shown}{same} and are scored on the ONNX "
                                   "model (transfer)")
        return
    if not use_source:
        return
    reasons = []
    for cand in _source_candidates(model):
        if not cand.is_file():
            continue
        size = src.get("size_bytes")
        if isinstance(size, int) and cand.stat().st_size != size:  # no hashing of a large file the metadata names
            reasons.append(f"{printable(str(cand))} has another size than the export record")
            continue
        if want_sha is None or sha256_file(cand) != want_sha:
            reasons.append(f"{printable(str(cand))} has another sha256 than the export record")
            continue
        try:
            sur = load(cand, device=device)
            _check_compatible(model, sur, printable(str(cand)))
        except RcompError as exc:
            reasons.append(f"{printable(str(cand))} did not load: {exc}")
            continue
        model.set_gradient_model(sur, f"surrogate {printable(cand.name)} (source checkpoint, sha256 "
                                      f"{want_sha[:12]}), scored on the exported model")
        model.surrogate_message = (f"gradient attacks run on the source checkpoint {printable(str(cand))} (sha256 "
                                   "matches the export record) and are scored on the ONNX model (transfer)")
        return
    if reasons:
        model.no_surrogate_reason = "its source checkpoint " + "; ".join(reasons)
    elif src.get("path"):
        model.no_surrogate_reason = f"its source checkpoint {printable(str(src.get('path')))} is not there"


def _check_compatible(model: OnnxClassifier, sur, shown: str) -> None:
    if tuple(sur.meta.input.shape) != tuple(model.meta.input.shape) or sur.meta.num_classes != model.meta.num_classes:
        raise RcompError(f"surrogate {shown} takes {'x'.join(map(str, sur.meta.input.shape))} images "
                         f"with {sur.meta.num_classes} classes but the ONNX model takes "
                         f"{'x'.join(map(str, model.meta.input.shape))} with {model.meta.num_classes}; give a "
                         "checkpoint for the same task")


def refuse_gradient_attacks(model, attacks: dict[str, Any], name: str, log=None) -> None:
    """Refuse, before anything runs, gradient attacks on an ONNX model that has no surrogate."""
    if not getattr(model, "is_onnx", False):
        return
    grad = []
    for key, a in attacks.items():
        stages = getattr(a, "stages", None) or {key: a}
        grad += [k for k, s in stages.items() if getattr(s, "uses_gradients", True)]
    if model.has_surrogate:
        if not grad:  # only black-box attacks (or none): the report says so, not the unused surrogate
            model.set_gradient_model(None)
        elif log is not None and model.surrogate_message:
            log(f"{printable(name)}: {model.surrogate_message}")
        return
    why = f" ({model.no_surrogate_reason})" if model.no_surrogate_reason else ""
    if grad:
        raise RcompError(f"{printable(name)} is an ONNX model without gradients and no surrogate{why}, so gradient "
                         f"attacks ({', '.join(sorted(set(grad)))}) cannot run on it; give --surrogate CKPT (the "
                         "checkpoint it was exported from: their examples are then scored on the ONNX model) or use "
                         "--attack square (black box)")
    if attacks and log is not None:
        log(f"{printable(name)}: no gradient surrogate{why}; black-box attacks only (--surrogate CKPT adds transfer "
            "attacks)")
