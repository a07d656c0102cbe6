"""Checks a checkpoint must pass before and while it is built: sizes, shapes, values.

A checkpoint is data from anywhere. The metadata could ask for a network of billions of
parameters, a structure that contradicts the tensors, or weights that are NaN; each is refused
with one line naming what is wrong, before memory is spent on it. Internal exceptions that
still escape a build become one line too (:func:`internal_errors`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from rcomp.errors import RcompError
from rcomp.text import printable

#: Caps on what metadata may ask for, whatever the file holds.
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 4096
MAX_SIDE = 16384
MAX_PIXELS = 1 << 26  # channels x height x width of one input image
#: A fresh (unpruned) build may hold at most this many times the elements in the file, plus the slack:
#: pruning shrinks a network about 100x at ratio 0.9; beyond, the metadata is lying.
FRESH_FACTOR = 256
FRESH_SLACK = 1 << 26
MAX_ELEMENTS = 1 << 31
#: Probe forward passes (to catch layers that do not connect) only for inputs up to this size.
PROBE_MAX_PIXELS = 1 << 20


class BuildLimitError(RcompError):
    """The metadata asks for more modules or elements than the file can justify."""


def _file_numel(header) -> int:
    return sum(t.numel for t in header.tensors.values())


def check_bounds(meta, where: str) -> None:
    """Sane caps on the sizes the metadata names directly (classes, input shape)."""
    if meta.num_classes > MAX_CLASSES:
        raise RcompError(f"{where}: {meta.num_classes} classes is over the limit of {MAX_CLASSES}; "
                         "the metadata is damaged or edited")
    c, h, w = meta.input.shape
    if c > MAX_CHANNELS or h > MAX_SIDE or w > MAX_SIDE or c * h * w > MAX_PIXELS:
        raise RcompError(f"{where}: input shape {c}x{h}x{w} is over the limits ({MAX_CHANNELS} channels, "
                         f"{MAX_SIDE} pixels a side, {MAX_PIXELS} values); the metadata is damaged or edited")


@contextlib.contextmanager
def build_limits(header, where: str) -> Iterator[None]:
    """Refuse, while a network is being built, more modules or elements than the file can justify.

    Global module-registration hooks count every submodule, parameter and buffer as it is made,
    so even an architecture whose constructor loops on a metadata value stops early.
    """
    import torch.nn.modules.module as M

    n_tensors, numel = len(header.tensors), _file_numel(header)
    max_modules = 16 * n_tensors + 1024
    max_numel = min(FRESH_FACTOR * numel + FRESH_SLACK, MAX_ELEMENTS)
    count = {"modules": 0, "numel": 0}

    def on_module(_mod, _name, _sub):
        count["modules"] += 1
        if count["modules"] > max_modules:
            raise BuildLimitError(f"{where}: the architecture in the metadata builds more than {max_modules} modules "
                             f"or tensors for a file of {n_tensors} tensors; the metadata is damaged or edited")

    def on_tensor(_mod, _name, t):
        on_module(None, None, None)  # leaf layers register tensors, not submodules: count those too
        count["numel"] += t.numel() if t is not None else 0
        if count["numel"] > max_numel:
            raise BuildLimitError(f"{where}: the architecture in the metadata needs more than {max_numel} values for a "
                             f"file holding {numel}; its sizes (arch kwargs, classes, structure) are damaged or edited")

    handles = [M.register_module_module_registration_hook(on_module),
               M.register_module_parameter_registration_hook(on_tensor),
               M.register_module_buffer_registration_hook(on_tensor)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_state_fits(expected: dict[str, tuple], found: dict[str, tuple], resizable: set[str], meta,
                     where: str) -> None:
    """Names, dtypes and shapes (``(shape, dtype)`` pairs) of the file against the architecture's."""
    from rcomp.io.serialize import DTYPES

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = [f"{label} {printable(', '.join(keys[:5]))}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise RcompError(f"{where}: tensors do not fit architecture {printable(meta.arch.name)}: {'; '.join(parts)}")
    for key, (shape, dtype) in found.items():
        want_shape, want_dtype = expected[key]
        got, want = DTYPES.get(dtype, str(dtype)), DTYPES.get(want_dtype, str(want_dtype))
        if got != want:
            raise RcompError(f"{where}: tensor {printable(key)} has dtype {got}, the architecture needs {want}")
        owner = key.rpartition(".")[0]
        net_name = owner[len("net."):] if owner.startswith("net.") else None
        if tuple(want_shape) != tuple(shape) and net_name not in resizable:
            raise RcompError(f"{where}: tensor {printable(key)} has shape {tuple(shape)}, "
                             f"the architecture needs {tuple(want_shape)}")


def check_against_file(meta, header, build_kw: dict[str, Any], quantized: bool, where: str):
    """Build the architecture on the meta device (no memory) and compare it with the file's tensors.

    Returns ``(skeleton, resizable)`` (the meta network with the pruned structure applied, and the
    names of the resized modules), or None where the architecture cannot be built on the meta device.
    """
    from rcomp.models.structure import apply_structure, build_skeleton, check_structure_shapes

    check_bounds(meta, where)
    with build_limits(header, where):
        skeleton = build_skeleton(meta, **build_kw)
    if skeleton is None:  # built for real later, still under build_limits
        return None
    structure = meta.compression.get("structure", {})
    resizable = apply_structure(skeleton, structure, where=where)
    shapes = {k: t.shape for k, t in header.tensors.items()}
    check_structure_shapes(skeleton, structure, shapes, "net.", where)
    if quantized:
        _check_float_shapes(meta, header, where)
        return skeleton, resizable
    expected = {f"net.{k}": (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    c = meta.input.channels
    expected.update({f"normalize.{k}": ((1, c, 1, 1), _float32()) for k in ("mean", "std")})
    check_state_fits(expected, {k: (t.shape, t.dtype) for k, t in header.tensors.items()}, resizable, meta, where)
    return skeleton, resizable


def materialize(skeleton):
    """The meta ``skeleton`` given uninitialised CPU storage, when loading the file then sets every value.

    None when some state would stay unset: non-persistent buffers (not in the file) or tensors kept
    as plain attributes (still on the meta device); the caller then builds the network for real.
    """
    import torch

    for mod in skeleton.modules():
        if mod._non_persistent_buffers_set or any(
                isinstance(v, torch.Tensor) and v.is_meta for v in vars(mod).values()):
            return None
    return skeleton.to_empty(device="cpu")


def _float32():
    import torch

    return torch.float32


def _check_float_shapes(meta, header, where: str) -> None:
    """Quantized files: every recorded float shape is no larger than the largest tensor in the file."""
    q = meta.compression.get("quantization")
    shapes = q.get("float_shapes", {}) if isinstance(q, dict) else None
    if not isinstance(shapes, dict):
        return  # the quantization handler refuses it with its own message
    largest = max((t.numel for t in header.tensors.values()), default=0)
    for key, shape in shapes.items():
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape) and math.prod(shape) > largest:
            raise RcompError(f"{where}: quantization metadata gives {printable(key)} the shape {shape}, larger than "
                             "any tensor in the file; the metadata is damaged or edited")


def check_finite(tensors: dict, where: str) -> None:
    """Refuse NaN or infinite values in any floating-point tensor, naming the first one."""
    import torch

    for key, t in tensors.items():
        if not t.is_floating_point() or bool(torch.isfinite(t.sum(dtype=torch.float64))):
            continue  # a sum is finite only if every value is (float64: no overflow for real weights)
        if not bool(torch.isfinite(t).all()):
            raise RcompError(f"{where}: tensor {printable(key)} holds NaN or infinite values; "
                             "the checkpoint is damaged (or its training diverged): use another checkpoint")


def check_normalize(model, where: str) -> None:
    """The normalisation buffers agree with the input spec in the metadata."""
    import torch

    for k in ("mean", "std"):
        buf = getattr(model.normalize, k).flatten()
        want = torch.tensor(getattr(model.meta.input, k), dtype=torch.float32)
        if buf.shape != want.shape or not torch.allclose(buf, want):
            raise RcompError(f"{where}: normalize.{k} tensor disagrees with the input spec in the metadata")


def probe_forward(model, where: str) -> None:
    """One forward pass on a zero image, to catch pruned layers that no longer connect."""
    import torch

    if math.prod(model.meta.input.shape) > PROBE_MAX_PIXELS:
        return
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *model.meta.input.shape))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise RcompError(f"{where}: the layers recorded in the file do not connect (a probe input fails in "
                         "them; --debug shows where); the structure metadata is damaged or edited") from exc
    if tuple(out.shape) != (1, model.meta.num_classes):
        raise RcompError(f"{where}: the model gives outputs of shape {tuple(out.shape)}, not "
                         f"(1, {model.meta.num_classes}) for its {model.meta.num_classes} classes")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return printable(text.splitlines()[0] if text else type(exc).__name__, 120)


@contextlib.contextmanager
def internal_errors(where: str) -> Iterator[None]:
    """Turn exceptions from torch or a constructor fed with lying metadata into one RcompError line."""
    try:
        yield
    except RcompError:
        raise
    except MemoryError:
        raise RcompError(f"{where} asks for more memory than this machine has; its metadata is damaged "
                         "or edited") from None
    except (RuntimeError, RecursionError, OverflowError, AttributeError, KeyError, IndexError, TypeError,
            ValueError, NotImplementedError, ZeroDivisionError) as exc:
        if "can't allocate" in str(exc) or "out of memory" in str(exc):
            raise RcompError(f"{where} asks for more memory than this machine has; its metadata is damaged "
                             "or edited") from None
        raise RcompError(f"{where} cannot be loaded: its metadata and tensors are inconsistent "
                         f"({type(exc).__name__} while building it; --debug shows where); re-create it with "
                         "rcomp convert") from exc


#: a freshly built model (``--arch NAME --arch-kwargs ...``) holds at most this many values (8 GiB of float32)
MAX_FRESH_ELEMENTS = 1 << 31


def check_fresh_build(name: str, kwargs: dict, build) -> None:
    """Build the network once on the meta device (no memory) and refuse one whose sizes are beyond
    :data:`MAX_FRESH_ELEMENTS`, or that cannot be built with these kwargs, before it is built for real."""
    import torch

    try:
        with torch.device("meta"):
            net = build()
    except RcompError:
        raise
    except NotImplementedError:  # an initialiser the meta device lacks (torchvision regnet): sized when built
        return
    except (RuntimeError, ValueError, OverflowError, MemoryError, IndexError, ZeroDivisionError) as exc:
        raise RcompError(f"architecture {printable(name, 60)} cannot be built with {printable(kwargs, 120)} "
                         f"({type(exc).__name__}); check --arch-kwargs") from None
    n = sum(t.numel() for t in net.parameters()) + sum(t.numel() for t in net.buffers())
    if n > MAX_FRESH_ELEMENTS:
        raise RcompError(f"architecture {printable(name, 60)} with {printable(kwargs, 120)} needs {n:,} values, over "
                         f"the limit of {MAX_FRESH_ELEMENTS:,}; give smaller sizes in --arch-kwargs")
