"""Turn a checkpoint file into a :class:`~rcomp.models.wrapper.Classifier` and back (no pickle).

The file format itself (header, metadata schema, serialisation, atomic writes) lives in
:mod:`rcomp.io`; this module builds modules. Order of a load, so that a hostile file is refused
before anything large is allocated or any code runs:

1. read and validate the header (:func:`rcomp.io.header.read_header`, bounded, regular files only);
2. parse the metadata schema (:class:`rcomp.io.format.CheckpointMeta`);
3. check the sizes it implies against sane caps and the tensors in the file: the architecture is
   first built on the ``meta`` device (no memory) under caps on modules and elements, and every
   parameter shape is compared with the file (:func:`rcomp.models.checks.check_against_file`);
4. build the real network, load the tensors (refusing non-finite values), restore compression
   state through the handler table :data:`COMPRESSION_HANDLERS`.

Compression state is pluggable: ``COMPRESSION_HANDLERS`` maps a ``compression`` key of the
metadata to the module (named, imported only when a file needs it) that exports and restores
it. :mod:`rcomp.quant.storage` handles ``"quantization"``.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import rcomp.io.atomic as atomic
from rcomp.errors import RcompError
from rcomp.io.format import CheckpointMeta
from rcomp.io.header import read_header
from rcomp.models import checks
from rcomp.models.structure import apply_structure, structure_diff
from rcomp.text import printable

#: compression key -> module with ``export(model) -> tensors`` and ``restore(model, tensors, where)``.
COMPRESSION_HANDLERS: dict[str, str] = {"quantization": "rcomp.quant.storage"}


def register_compression_handler(key: str, module: str) -> None:
    """Let ``module`` (a dotted name, imported lazily) export and restore ``compression[key]``."""
    COMPRESSION_HANDLERS[key] = module


def compression_handler(meta: CheckpointMeta):
    """The handler module for the compression state of ``meta``, or None for plain float weights."""
    for key, module in COMPRESSION_HANDLERS.items():
        if meta.compression.get(key):
            return importlib.import_module(module)
    return None


def fit_state(model, tensors: dict, resizable: set[str], where: str = "checkpoint") -> None:
    """Load ``tensors`` into ``model`` (strict), resizing parameters of the ``resizable`` modules."""
    import torch

    expected = model.state_dict()
    checks.check_state_fits({k: (tuple(v.shape), v.dtype) for k, v in expected.items()},
                     {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, resizable, model.meta, where)
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owners[f"{mname}.{pname}" if mname else pname] = (mod, pname)
    for key, t in tensors.items():
        if tuple(expected[key].shape) == tuple(t.shape):
            continue
        mod, pname = owners[key]
        empty = torch.empty(t.shape, dtype=t.dtype)
        if pname in mod._parameters:
            mod._parameters[pname] = torch.nn.Parameter(empty, requires_grad=mod._parameters[pname].requires_grad)
        else:
            mod._buffers[pname] = empty
    model.load_state_dict(with_versions(tensors, expected), strict=True)


def with_versions(tensors: dict, reference) -> dict:
    """``tensors`` carrying the module versions (``state_dict._metadata``) of ``reference``.

    Some modules check the version their weights were saved with (torchvision's MNASNet refuses
    ``None``); rcomp files are written from modules built by the same code, so the versions of a
    fresh build of the architecture are the right ones.
    """
    from collections import OrderedDict

    state = OrderedDict(tensors)
    versions = getattr(reference, "_metadata", None)
    if versions is not None:
        state._metadata = versions  # type: ignore[attr-defined]
    return state


def _build(path: Path, meta: CheckpointMeta, header, factory: str | None, trust_factory: bool, where: str):
    """Check the metadata against the file, then build the Classifier and load its tensors."""
    from rcomp.io.serialize import load_tensors
    from rcomp.models.registry import build_net
    from rcomp.models.wrapper import Classifier

    handler = compression_handler(meta)
    kw = {"allow_factory": factory, "trust_factory": trust_factory}
    checked = checks.check_against_file(meta, header, kw, quantized=handler is not None, where=where)
    net = checks.materialize(checked[0]) if checked is not None and handler is None else None
    if net is not None:  # the skeleton checked against the file becomes the model: one build, not two
        resizable = checked[1]
    else:
        with checks.build_limits(header, where):
            net = build_net(meta.arch, meta.input, meta.num_classes, **kw)
        resizable = apply_structure(net, meta.compression.get("structure", {}), where=where)
    model = Classifier(net, meta)
    tensors = load_tensors(path)
    checks.check_finite(tensors, where)
    if handler is not None:
        model = handler.restore(model, tensors, where=where)
    else:
        fit_state(model, tensors, resizable, where=where)
    checks.check_normalize(model, where)
    if handler is not None or resizable:
        checks.probe_forward(model, where)
    return model


def load(path: str | Path, device: str = "cpu", *, factory: str | None = None, trust_factory: bool = False):
    """Load an rcomp checkpoint into a :class:`~rcomp.models.wrapper.Classifier` in eval mode.

    ``factory``: the ``package.module:factory`` the caller names itself; only then (or with
    ``trust_factory=True``) is a checkpoint made from a user factory loaded.
    """
    from rcomp.io.header import sha256_file

    path = Path(path)
    if path.name.lower().endswith(".onnx"):  # an ONNX file written by rcomp export (rcomp.onnx.runtime)
        from rcomp.onnx.runtime import load_onnx

        return load_onnx(path, device)
    where = printable(str(path))
    header = read_header(path)
    meta = CheckpointMeta.from_metadata(header.metadata, where=where)
    if factory is not None and factory != meta.arch.name:
        raise RcompError(f"--arch {printable(factory)} does not match the checkpoint's architecture "
                         f"{printable(meta.arch.name)}")
    with checks.internal_errors(where):
        model = _build(path, meta, header, factory, trust_factory, where)
    model.eval()
    model.source_path = path
    model.source_sha256 = sha256_file(path)
    return model.to(device) if device != "cpu" else model


def state_tensors(model) -> dict[str, Any]:
    """The float model's state as plain contiguous CPU tensors (shared storage cloned apart)."""
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[k] = t
    return tensors


def to_bytes(model) -> bytes:
    """Serialise ``model`` (a Classifier) to safetensors bytes, refreshing its compression state."""
    from rcomp.io.serialize import serialize

    meta = model.meta
    handler = compression_handler(meta)
    if handler is not None:
        tensors = handler.export(model)
    else:
        structure = structure_diff(model)
        if structure:
            meta.compression["structure"] = structure
        else:
            meta.compression.pop("structure", None)
        tensors = state_tensors(model)
        meta.stats["params"] = sum(p.numel() for p in model.net.parameters())
    return serialize(tensors, meta.to_metadata())


def save(model, path: str | Path, *, force: bool = False, inputs: tuple = ()) -> str:
    """Write ``model`` to ``path`` atomically; returns the file's sha256.

    Refuses an existing file unless ``force=True`` (``--force`` on the command line); even then,
    only a regular file is replaced. Without ``force`` the file is published exclusively: if
    another process creates ``path`` meanwhile, this call fails and that file is kept.
    """
    path = atomic.check_output_path(Path(path), tuple(Path(p) for p in inputs), force=force)
    data = to_bytes(model)
    extra = {} if force else {"exclusive": True}  # (tests replace atomic_write_bytes by a 2-argument writer)
    atomic.atomic_write_bytes(path, data, **extra)
    return hashlib.sha256(data).hexdigest()
