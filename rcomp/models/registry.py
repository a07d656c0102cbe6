"""Turns architecture names into networks (in the manner of timm's registry).

Three kinds of names:

* built-ins: ``convnet8``, ``resnet18-cifar``, ``mlp``;
* any torchvision classification model by its torchvision name (``resnet18``, ``mobilenet_v2``...);
* any timm model as ``timm:NAME`` (the optional extra ``rcomp[timm]``; :mod:`rcomp.models.timm_source`);
* a user's own model as ``package.module:factory`` (called as ``factory(**kwargs)`` with
  ``num_classes`` added when the factory accepts it).

Security rule: a user factory is imported only when the user names it on the command line
(``--arch pkg.mod:fn``) or passes ``trust_factory=True`` (``--trust-factory``). A checkpoint that
merely *names* a module never causes an import.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import replace

from rcomp.errors import RcompError
from rcomp.io.format import CheckpointMeta
from rcomp.spec import ArchSpec, InputSpec
from rcomp.text import printable

_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def builtin_names() -> list[str]:
    from rcomp.models.builtin import BUILTINS

    return sorted(BUILTINS)


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def list_models() -> list[str]:
    """Every registered name: built-ins first, then torchvision classification models."""
    return builtin_names() + torchvision_names()


def default_input_shape(name: str) -> tuple[int, int, int]:
    from rcomp.models.builtin import BUILTINS

    if name in BUILTINS:
        return BUILTINS[name][2]
    if name.startswith("timm:"):  # timm's pretrained config (rcomp.models.timm_source)
        from rcomp.models.timm_source import pretrained_input

        found = pretrained_input(name)
        return found[0] if found else (3, 224, 224)
    return (3, 224, 224)


def is_user_factory(name: str) -> bool:
    return ":" in name and not name.startswith("timm:")


def _check_user_factory(name: str, allow: str | None, trust: bool) -> None:
    if not _FACTORY_RE.match(name):
        raise RcompError(
            f"architecture {printable(repr(name), 80)} is not a registered name nor of the form package.module:factory; "
            "see `rcomp info --models`"
        )
    if not (trust or allow == name):
        raise RcompError(
            f"checkpoint was made with the user factory {name!r}; rcomp never imports code named by a file. "
            f"If you trust it, name it yourself: --arch {name} (or pass --trust-factory)"
        )


def build_net(arch: ArchSpec, spec: InputSpec, num_classes: int, *, allow_factory: str | None = None,
              trust_factory: bool = False):
    """Build the bare network (no normalisation) for ``arch``."""
    from rcomp.models.builtin import BUILTINS

    name, kwargs = arch.name, dict(arch.kwargs)
    if name.startswith("timm:"):  # a known source, like torchvision: imports timm only
        from rcomp.models.timm_source import build

        return build(name, spec, num_classes, kwargs)
    if name in BUILTINS:
        fn = BUILTINS[name][0]
        try:
            return fn(spec, num_classes, **kwargs)
        except TypeError as exc:
            raise RcompError(f"bad arguments for architecture {name}: {_first_line(exc)}") from None
    if is_user_factory(name):
        _check_user_factory(name, allow_factory, trust_factory)
        mod_name, fn_name = name.split(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise RcompError(f"cannot import {mod_name} for --arch {name}: {exc}; is it on PYTHONPATH?") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise RcompError(f"{mod_name} has no callable {fn_name!r} (from --arch {name})")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_classes" in params and "num_classes" not in kwargs:
            kwargs["num_classes"] = num_classes
        try:
            return fn(**kwargs)
        except TypeError as exc:
            raise RcompError(f"calling {name}(**{printable(kwargs, 120)}) failed: {_first_line(exc)}") from None
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise RcompError(f"unknown architecture {printable(repr(name), 80)}; choose one of `rcomp info --models` or package.module:factory")
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        import difflib

        close = difflib.get_close_matches(name, builtin_names() + tvm.list_models(module=tvm), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RcompError(f"unknown architecture {printable(repr(name), 80)}{hint}; see `rcomp info --models`")
    if spec.channels != 3:
        raise RcompError(
            f"torchvision model {name} takes 3-channel images; use --input-shape 3,H,W "
            "(grey datasets are repeated to RGB automatically)"
        )
    try:
        return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise RcompError(f"cannot build torchvision model {name} with {printable(kwargs, 120)}: "
                         f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return printable(text.splitlines()[0] if text else type(exc).__name__, 160)


def build_model(name: str, num_classes: int = 10, input_shape: tuple[int, int, int] | None = None,
                mean: list[float] | None = None, std: list[float] | None = None, kwargs: dict | None = None,
                *, dataset: str | None = None, class_names: list[str] | None = None, trust_factory: bool = False):
    """Build a fresh :class:`~rcomp.models.wrapper.Classifier` (random weights) by registry name.

    >>> model = build_model("convnet8", num_classes=10, input_shape=(1, 8, 8))
    """
    from rcomp.models.wrapper import Classifier

    c, h, w = input_shape or default_input_shape(name)
    spec = InputSpec(channels=c, height=h, width=w, mean=list(mean) if mean is not None else [0.0] * c,
                     std=list(std) if std is not None else [1.0] * c).validate("--input-shape/--mean/--std")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise RcompError(f"--num-classes must be a positive integer, got {num_classes!r}")
    arch = ArchSpec(name, dict(kwargs or {}))
    net = build_net(arch, spec, num_classes, allow_factory=name, trust_factory=trust_factory)
    meta = CheckpointMeta(arch=arch, input=spec, num_classes=num_classes, class_names=class_names, dataset=dataset)
    return Classifier(net, meta)


def fresh_like(meta: CheckpointMeta, **kw):
    """A freshly built (unpruned, random) Classifier of the same architecture as ``meta``."""
    from rcomp.models.wrapper import Classifier

    net = build_net(meta.arch, meta.input, meta.num_classes, **kw)
    return Classifier(net, replace(meta, compression={}, history=list(meta.history)))
