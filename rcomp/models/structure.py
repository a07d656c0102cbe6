"""Pruned structure: the shape attributes of the modules that differ from a fresh build.

Structured pruning (torch-pruning) shrinks channels in place; a checkpoint records, for each
changed module, only its shape attributes (``out_channels``, ``num_features``...). Loading builds
the original architecture, sets those attributes and takes the tensors' shapes. Everything the
metadata says is checked against the tensors in the file before a byte is allocated.
"""

from __future__ import annotations

import json
from typing import Any

from rcomp.errors import RcompError
from rcomp.models.checks import BuildLimitError
from rcomp.text import printable

#: Shape attributes recorded for structurally changed modules, and only these are ever set on load.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "normalized_shape", "num_channels", "num_groups", "embed_dim")

#: Pseudo-attribute: ``{tensor name: shape}`` of resized tensors of a module without shape attributes.
TENSOR_SHAPES = "tensor_shapes"

_reference_cache: dict[str, tuple] = {}


def shape_attrs(net) -> dict[str, dict[str, Any]]:
    """The shape attributes of every module that has any (conv, linear, norm layers)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in net.named_modules():
        attrs = {}
        for a in SHAPE_ATTRS:
            if isinstance(getattr(type(mod), a, None), property):
                continue  # derived from a submodule (timm's ConvNormAct.in_channels): that one records it
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


def build_skeleton(meta, **kw):
    """The network of ``meta``'s architecture on the meta device (no memory), or None if it cannot be."""
    import torch

    from rcomp.models.registry import build_net

    try:
        with torch.device("meta"), _skip_meta_inplace():
            return build_net(meta.arch, meta.input, meta.num_classes, **kw)
    except BuildLimitError:
        raise
    except Exception:  # noqa: BLE001 - some torchvision models compute sizes with real tensors
        return None  # the real build (still under the limits) gives the real error, if any


def _skip_meta_inplace():
    """A torch function mode that skips in-place ops (weight initialisation) on meta tensors.

    On the meta device they only check shapes, yet ``normal_`` goes through Python reference
    implementations that cost a mobilenet_v2 100 ms; shapes are all a skeleton needs.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipInplace(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if (name.endswith("_") and not name.endswith("__") and name not in ("resize_", "set_", "as_strided_") and args
                    and isinstance(args[0], torch.Tensor) and args[0].is_meta):
                return args[0]
            return func(*args, **(kwargs or {}))

    return SkipInplace()


def free_shapes(net) -> dict[str, dict[str, list[int]]]:
    """Shapes of the tensors held directly by modules without shape attributes (e.g. a ConvNeXt
    block's layer-scale ``gamma``), which pruning may shrink too."""
    out: dict[str, dict[str, list[int]]] = {}
    attrs = shape_attrs(net)
    for name, mod in net.named_modules():
        if name in attrs:
            continue
        shapes = {p: list(t.shape) for p, t in list(mod._parameters.items()) + list(mod._buffers.items())
                  if t is not None}
        if shapes:
            out[name] = shapes
    return out


def _reference_attrs(meta) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[int]]]]:
    from rcomp.models.registry import build_net

    key = json.dumps([meta.arch.name, meta.arch.kwargs, meta.input.shape, meta.num_classes], sort_keys=True)
    if key not in _reference_cache:
        net = build_skeleton(meta, trust_factory=True)
        if net is None:
            net = build_net(meta.arch, meta.input, meta.num_classes, trust_factory=True)
        _reference_cache[key] = (shape_attrs(net), free_shapes(net))
    return _reference_cache[key]


def structure_diff(model) -> dict[str, dict[str, Any]]:
    """Shape attributes of the modules of ``model.net`` that differ from a fresh build (and, under
    ``tensor_shapes``, the changed shapes of tensors held by modules without shape attributes)."""
    ref, ref_free = _reference_attrs(model.meta)
    cur = shape_attrs(model.net)
    out = {name: attrs for name, attrs in cur.items() if ref.get(name) != attrs}
    for name, shapes in free_shapes(model.net).items():
        changed = {p: s for p, s in shapes.items() if ref_free.get(name, {}).get(p) != s}
        if changed:
            out.setdefault(name, {})[TENSOR_SHAPES] = changed
    return out


def _valid_value(v: Any) -> bool:
    def ok(x):
        return isinstance(x, int) and not isinstance(x, bool) and 0 < x < 2**31

    return ok(v) or (isinstance(v, list) and 0 < len(v) <= 8 and all(ok(x) for x in v))


def apply_structure(net, structure: dict[str, Any], where: str = "checkpoint") -> set[str]:
    """Set the recorded shape attributes on ``net``'s modules; returns the names touched."""
    if not isinstance(structure, dict):
        raise RcompError(f"{where}: compression.structure must be an object")
    modules = dict(net.named_modules())
    for name, attrs in structure.items():
        if name not in modules:
            raise RcompError(f"{where}: compression state names module {printable(repr(name), 80)}, "
                             "which the architecture does not have")
        if not isinstance(attrs, dict):
            raise RcompError(f"{where}: compression state for {printable(repr(name), 80)} is malformed")
        for a, v in attrs.items():
            if a == TENSOR_SHAPES:
                _check_tensor_shapes(modules[name], name, v, where)
                continue
            if a not in SHAPE_ATTRS or not hasattr(modules[name], a) or isinstance(
                    getattr(type(modules[name]), a, None), property):
                raise RcompError(f"{where}: compression state sets unknown attribute {printable(repr(a), 40)} "
                                 f"on {printable(repr(name), 80)}")
            if not _valid_value(v):
                raise RcompError(f"{where}: compression state gives {printable(name, 80)}.{a} "
                                 f"the invalid value {printable(repr(v), 40)}")
            setattr(modules[name], a, tuple(v) if isinstance(v, list) else v)
    return set(structure)


def _check_tensor_shapes(mod, name: str, shapes: Any, where: str) -> None:
    """``tensor_shapes`` names tensors the module holds, with valid shapes of the same rank; the
    tensors themselves are resized from the file when it is loaded (nothing is allocated here)."""
    own = {**mod._parameters, **mod._buffers}
    if not isinstance(shapes, dict) or not shapes:
        raise RcompError(f"{where}: compression state for {printable(repr(name), 80)} is malformed")
    for p, shape in shapes.items():
        if own.get(p) is None:
            raise RcompError(f"{where}: compression state resizes tensor {printable(repr(p), 40)} of "
                             f"{printable(repr(name), 80)}, which the architecture does not have")
        if not (isinstance(shape, list) and _valid_value(shape) and len(shape) == own[p].dim()):
            raise RcompError(f"{where}: compression state gives {printable(name, 80)}.{printable(p, 40)} "
                             f"the invalid shape {printable(repr(shape), 40)}")


def implied_shapes(mod) -> dict[str, tuple[int, ...]]:
    """The parameter shapes a module's shape attributes imply (conv, linear, norm layers)."""
    from torch import nn

    if isinstance(mod, nn.modules.conv._ConvNd):
        if mod.in_channels % mod.groups or mod.out_channels % mod.groups:
            return {"groups": (mod.groups,)}  # flagged by the caller: channels not divisible by groups
        a, b = (mod.in_channels, mod.out_channels) if mod.transposed else (mod.out_channels, mod.in_channels)
        return {"weight": (a, b // mod.groups, *mod.kernel_size), "bias": (mod.out_channels,)}
    if isinstance(mod, nn.Linear):
        return {"weight": (mod.out_features, mod.in_features), "bias": (mod.out_features,)}
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        n = (mod.num_features,)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n}
    if isinstance(mod, nn.GroupNorm):
        if mod.num_channels % mod.num_groups:
            return {"groups": (mod.num_groups,)}
        return {"weight": (mod.num_channels,), "bias": (mod.num_channels,)}
    if isinstance(mod, nn.LayerNorm):
        return {"weight": tuple(mod.normalized_shape), "bias": tuple(mod.normalized_shape)}
    return {}


def check_structure_shapes(net, structure: dict[str, Any], shapes: dict[str, tuple[int, ...]], prefix: str,
                           where: str) -> None:
    """Refuse structure metadata that contradicts the shapes of the tensors in the file."""
    modules = dict(net.named_modules())
    for name in structure:
        implied = implied_shapes(modules[name])
        implied.update({p: tuple(s) for p, s in structure[name].get(TENSOR_SHAPES, {}).items()})
        for pname, want in implied.items():
            if pname == "groups":
                raise RcompError(f"{where}: the pruned structure of {printable(name, 80)} has channels not "
                                 f"divisible by its {want[0]} groups; the file is damaged or edited")
            key = f"{prefix}{name}.{pname}"
            if key in shapes and tuple(shapes[key]) != tuple(want):
                raise RcompError(f"{where}: the pruned structure says {printable(key, 80)} has shape {want}, "
                                 f"but the tensor in the file has shape {tuple(shapes[key])}; "
                                 "the structure metadata contradicts the tensors (damaged or edited file)")
