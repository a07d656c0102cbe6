"""timm as an architecture source: ``--arch timm:NAME`` builds any timm model, never downloading.

timm is an optional extra (``pip install 'rcomp[timm]'``). It is a *known source*, like
torchvision: a checkpoint that records ``timm:NAME`` is rebuilt by calling
``timm.create_model(NAME, pretrained=False, ...)``, which imports nothing but timm itself. The
name must be one timm lists (:func:`timm.list_models` or a ``name.tag`` of
:func:`timm.list_pretrained`); ``hf-hub:``/``local-dir:`` sources and the keyword arguments of
``create_model`` that load files or weights (``pretrained``, ``checkpoint_path``,
``pretrained_cfg``...) are refused, so a file can never make rcomp read another file or reach
the network. ``HF_HUB_OFFLINE=1`` is also set before timm (and huggingface_hub) is first imported
unless the user set it.

The input spec: rcomp passes ``in_chans`` and ``num_classes``; models with a fixed input size
(ViTs: ``pretrained_cfg.fixed_input_size``) get ``img_size`` from the spec. :func:`pretrained_input`
reads the input size, mean and std from timm's pretrained config (data shipped inside timm, no
download) for ``rcomp convert``.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any

from rcomp.errors import RcompError
from rcomp.text import printable

PREFIX = "timm:"
EXTRA = "pip install 'rcomp[timm]'"
_NAME_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)?$")

#: keyword arguments of timm.create_model / build_model_with_cfg that load weights or files, reach the
#: network, change what is built beyond the architecture, or that rcomp sets itself.
REFUSED_KWARGS = {
    "pretrained": "rcomp never downloads weights; convert weight files with rcomp convert --arch timm:NAME",
    "pretrained_cfg": "a pretrained config names weight files", "pretrained_cfg_overlay": "it names weight files",
    "pretrained_strict": "it concerns weight loading", "pretrained_filter_fn": "it is code",
    "pretrained_model_args": "it concerns weight loading", "checkpoint_path": "it loads a file",
    "cache_dir": "it names a download folder", "model_cfg": "it is code", "kwargs_filter": "it is internal",
    "feature_cfg": "rcomp builds classifiers", "features_only": "rcomp builds classifiers",
    "out_indices": "rcomp builds classifiers", "feature_cls": "rcomp builds classifiers",
    "pruned": "it reads a pruning file; prune with rcomp prune", "scriptable": "it is a layer config",
    "exportable": "it is a layer config", "no_jit": "it is a layer config", "device": "use --device",
    "dtype": "rcomp models are float32", "num_classes": "use --num-classes",
    "in_chans": "use --input-shape C,H,W", "img_size": "use --input-shape C,H,W",
}

def is_timm(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def import_timm(what: str = "timm:NAME"):
    """The timm module, or a one-line error naming the extra to install."""
    if "timm" not in sys.modules and "huggingface_hub" not in sys.modules:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: rcomp never asks timm for weights
    try:
        import timm
        import timm.models
    except ImportError:
        raise RcompError(f"architecture {what} needs timm, an optional extra: {EXTRA}") from None
    return timm


def model_name(name: str) -> str:
    """``timm:NAME`` -> ``NAME`` after checking that timm knows it (an unknown name is one line)."""
    bare = name[len(PREFIX):] if is_timm(name) else name
    if not _NAME_RE.match(bare):
        raise RcompError(f"architecture {printable(repr(name), 80)}: timm names are lower-case letters, digits and "
                         "underscores, optionally with a .tag (e.g. timm:resnet18); see `rcomp info --models`")
    timm = import_timm(printable(name, 80))
    if bare not in _known_names(timm.__version__):
        import difflib

        close = difflib.get_close_matches(bare, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join('timm:' + c for c in close)}?)" if close else ""
        raise RcompError(f"timm {timm.__version__} has no model {printable(repr(bare), 80)}{hint}; "
                         "list them with python -c \"import timm; print(timm.list_models())\"")
    return bare


@functools.lru_cache(maxsize=1)
def _known_names(version: str) -> frozenset[str]:
    """Architectures and ``name.tag`` pretrained variants timm lists (cached: about 3000 names)."""
    import timm

    return frozenset(timm.list_models()) | frozenset(timm.list_pretrained())


def check_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments as plain data, without the ones that load files or that rcomp sets."""
    for key, value in kwargs.items():
        if key in REFUSED_KWARGS:
            raise RcompError(f"architecture argument {printable(repr(key), 40)} is not accepted for {printable(name, 80)}: "
                             f"{REFUSED_KWARGS[key]}")
        if not _plain(value):
            raise RcompError(f"architecture argument {printable(repr(key), 40)} for {printable(name, 80)} must be a "
                             "number, string, boolean or list of them")
    return dict(kwargs)


def _plain(v: Any, depth: int = 0) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, list) and depth < 2 and len(v) <= 64 and all(_plain(x, depth + 1) for x in v)


def pretrained_cfg(name: str):
    """timm's pretrained config for ``timm:NAME`` (data inside timm; nothing is downloaded), or None."""
    bare = model_name(name)
    timm = import_timm()
    try:
        return timm.models.get_pretrained_cfg(bare)
    except Exception:  # noqa: BLE001 - unknown tags etc.: no config to read
        return None


def build(name: str, spec, num_classes: int, kwargs: dict[str, Any]):
    """``timm.create_model(NAME, pretrained=False, num_classes=, in_chans=, **kwargs)`` (random weights)."""
    bare = model_name(name)
    kwargs = check_kwargs(name, kwargs)
    timm = import_timm()
    cfg = pretrained_cfg(name)
    extra: dict[str, Any] = {}
    if cfg is not None and getattr(cfg, "fixed_input_size", False) and tuple(cfg.input_size[1:]) != (spec.height, spec.width):
        extra["img_size"] = (spec.height, spec.width)
    try:
        return timm.create_model(bare, pretrained=False, num_classes=num_classes, in_chans=spec.channels,
                                 **extra, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError, AttributeError, NotImplementedError) as exc:
        text = str(exc).strip()
        first = printable(text.splitlines()[0] if text else type(exc).__name__, 160)
        raise RcompError(f"cannot build timm model {printable(bare, 80)} at input "
                         f"{spec.channels}x{spec.height}x{spec.width} with {printable(kwargs, 120)}: {first}") from None


def pretrained_input(name: str) -> tuple[tuple[int, int, int], list[float], list[float], str] | None:
    """Input size, mean and std of ``timm:NAME``'s pretrained config, and where they came from."""
    cfg = pretrained_cfg(name)
    if cfg is None or not cfg.input_size or not cfg.mean or not cfg.std:
        return None
    tag = f"{cfg.architecture}.{cfg.tag}" if getattr(cfg, "tag", None) else str(cfg.architecture)
    return tuple(int(v) for v in cfg.input_size), [float(v) for v in cfg.mean], [float(v) for v in cfg.std], tag


def names() -> list[str]:
    """Every ``timm:NAME`` timm lists (empty if timm is not installed)."""
    try:
        timm = import_timm()
    except RcompError:
        return []
    return [PREFIX + n for n in timm.list_models()]


def installed_version() -> str | None:
    """timm's installed version, read from its package metadata (timm is not imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timm")
    except PackageNotFoundError:
        return None
