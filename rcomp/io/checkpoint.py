"""Load and save whole models as rcomp checkpoints (safetensors, format v1, no pickle).

Weights are plain tensors; the header metadata holds everything needed to rebuild the exact
module (see :mod:`rcomp.io.format` and docs/checkpoint-format.md). Structured pruning is
stored as the shape attributes of each module that differs from a freshly built network of the
same architecture; loading builds that network, resizes those modules and loads the weights
with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError
from rcomp.io.atomic import atomic_write_bytes, check_output_path
from rcomp.io.format import CheckpointMeta
from rcomp.io.header import read_header

#: Shape attributes recorded for structurally changed modules, and only these are ever set on load.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "normalized_shape", "num_channels", "num_groups", "embed_dim")

_reference_cache: dict[str, dict[str, dict[str, Any]]] = {}


def shape_attrs(net) -> dict[str, dict[str, Any]]:
    """The shape attributes of every module that has any (conv, linear, norm layers)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in net.named_modules():
        attrs = {}
        for a in SHAPE_ATTRS:
            v = getattr(mod, a, None)
            if isinstance(v, bool):
                continue
            if isinstance(v, int):
                attrs[a] = v
            elif isinstance(v, tuple) and v and all(isinstance(x, int) for x in v) and a == "normalized_shape":
                attrs[a] = list(v)
        if attrs:
            out[name] = attrs
    return out


def _reference_attrs(meta: CheckpointMeta) -> dict[str, dict[str, Any]]:
    from rcomp.models.registry import build_net

    key = json.dumps([meta.arch.name, meta.arch.kwargs, meta.input.shape, meta.num_classes], sort_keys=True)
    if key not in _reference_cache:
        net = build_net(meta.arch, meta.input, meta.num_classes, trust_factory=True)
        _reference_cache[key] = shape_attrs(net)
    return _reference_cache[key]


def structure_diff(model) -> dict[str, dict[str, Any]]:
    """Shape attributes of the modules of ``model.net`` that differ from a fresh build."""
    ref = _reference_attrs(model.meta)
    cur = shape_attrs(model.net)
    return {name: attrs for name, attrs in cur.items() if ref.get(name) != attrs}


def apply_structure(net, structure: dict[str, Any], where: str = "checkpoint") -> set[str]:
    """Set the recorded shape attributes on ``net``'s modules; returns the names touched."""
    if not isinstance(structure, dict):
        raise RcompError(f"{where}: compression.structure must be an object")
    modules = dict(net.named_modules())
    for name, attrs in structure.items():
        if name not in modules:
            raise RcompError(f"{where}: compression state names module {name!r}, which the architecture does not have")
        if not isinstance(attrs, dict):
            raise RcompError(f"{where}: compression state for {name!r} is malformed")
        for a, v in attrs.items():
            if a not in SHAPE_ATTRS or not hasattr(modules[name], a):
                raise RcompError(f"{where}: compression state sets unknown attribute {a!r} on {name!r}")
            ok = (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31) or (
                isinstance(v, list) and all(isinstance(x, int) and 0 < x < 2**31 for x in v))
            if not ok:
                raise RcompError(f"{where}: compression state gives {name}.{a} the invalid value {v!r}")
            setattr(modules[name], a, tuple(v) if isinstance(v, list) else v)
    return set(structure)


def fit_state(model, tensors: dict, resizable: set[str], where: str = "checkpoint") -> None:
    """Load ``tensors`` into ``model`` (strict), resizing parameters of the ``resizable`` modules."""
    import torch

    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise RcompError(f"{where}: tensors do not fit architecture {model.meta.arch.name}: {'; '.join(parts)}")
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owners[f"{mname}.{pname}" if mname else pname] = (mname, mod, pname)
    for key, t in tensors.items():
        exp = expected[key]
        if exp.dtype != t.dtype:
            raise RcompError(f"{where}: tensor {key} has dtype {t.dtype}, the architecture needs {exp.dtype}")
        if tuple(exp.shape) == tuple(t.shape):
            continue
        mname, mod, pname = owners[key]
        net_name = mname[len("net."):] if mname.startswith("net.") else None
        if net_name not in resizable:
            raise RcompError(
                f"{where}: tensor {key} has shape {tuple(t.shape)}, the architecture needs {tuple(exp.shape)}"
            )
        empty = torch.empty(t.shape, dtype=t.dtype)
        if pname in mod._parameters:
            mod._parameters[pname] = torch.nn.Parameter(empty, requires_grad=mod._parameters[pname].requires_grad)
        else:
            mod._buffers[pname] = empty
    model.load_state_dict(tensors, strict=True)


def load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RcompError(f"{path} could not be read as safetensors: {str(exc).splitlines()[0][:200]}") from None


def load(path: str | Path, device: str = "cpu", *, factory: str | None = None, trust_factory: bool = False):
    """Load an rcomp checkpoint into a :class:`~rcomp.models.wrapper.Classifier` in eval mode.

    ``factory``: the ``package.module:factory`` the caller names itself; only then (or with
    ``trust_factory=True``) is a checkpoint made from a user factory loaded.
    """
    import torch

    from rcomp.models.registry import build_net
    from rcomp.models.wrapper import Classifier

    path = Path(path)
    header = read_header(path)
    meta = CheckpointMeta.from_metadata(header.metadata, where=str(path))
    if factory is not None and factory != meta.arch.name:
        raise RcompError(f"--arch {factory} does not match the checkpoint's architecture {meta.arch.name}")
    net = build_net(meta.arch, meta.input, meta.num_classes, allow_factory=factory, trust_factory=trust_factory)
    resizable = apply_structure(net, meta.compression.get("structure", {}), where=str(path))
    model = Classifier(net, meta)
    tensors = load_tensors(path)
    if meta.compression.get("quantization"):
        from rcomp.quant import storage

        model = storage.restore(model, tensors, where=str(path))
    else:
        fit_state(model, tensors, resizable, where=str(path))
    for k in ("mean", "std"):
        buf = getattr(model.normalize, k).flatten().tolist()
        if not torch.allclose(torch.tensor(buf), torch.tensor(getattr(meta.input, k), dtype=torch.float32)):
            raise RcompError(f"{path}: normalize.{k} tensor disagrees with the input spec in the metadata")
    model.eval()
    model.source_path = path
    model.source_sha256 = _sha256_path(path)
    return model.to(device) if device != "cpu" else model


def _sha256_path(path: Path) -> str:
    from rcomp.io.header import sha256_file

    return sha256_file(path)


def to_bytes(model) -> bytes:
    """Serialise ``model`` (a Classifier) to safetensors bytes, refreshing its compression state."""
    from rcomp.io.serialize import serialize

    meta = model.meta
    if meta.compression.get("quantization"):
        from rcomp.quant import storage

        tensors = storage.export(model)
    else:
        structure = structure_diff(model)
        if structure:
            meta.compression["structure"] = structure
        else:
            meta.compression.pop("structure", None)
        tensors = {}
        seen = set()
        for k, v in model.state_dict().items():
            t = v.detach().to("cpu").contiguous()
            if t.data_ptr() in seen:
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[k] = t
        meta.stats["params"] = sum(p.numel() for p in model.net.parameters())
    return serialize(tensors, meta.to_metadata())


def save(model, path: str | Path, *, force: bool = False, inputs: tuple = ()) -> str:
    """Write ``model`` to ``path`` atomically; refuses existing files unless ``force``. Returns sha256."""
    path = check_output_path(Path(path), tuple(Path(p) for p in inputs), force=force)
    data = to_bytes(model)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()
