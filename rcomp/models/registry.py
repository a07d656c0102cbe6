"""Turns architecture names into networks (in the manner of timm's registry).

The kinds of names (the sources of :data:`rcomp.models.catalog.SOURCES`):

* built-ins: ``convnet8``, ``resnet18-cifar``, ``mlp`` (:data:`rcomp.models.catalog.ARCHITECTURES`),
  and architectures installed packages declare in the ``rcomp.architectures`` entry-point group;
* any torchvision classification model by its torchvision name (``resnet18``, ``mobilenet_v2``...);
* any timm model as ``timm:NAME`` (the optional extra ``rcomp[timm]``; :mod:`rcomp.models.timm_source`);
* a user's own model as ``package.module:factory`` (called as ``factory(**kwargs)`` with
  ``num_classes`` added when the factory accepts it);
* ``PREFIX:NAME`` for a source registered with that prefix (e.g. ``timm:``).

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
from rcomp.models.catalog import ARCHITECTURES, DEFAULT_INPUT, is_user_factory, prefix_source
from rcomp.spec import ArchSpec, InputSpec
from rcomp.text import printable

_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def builtin_names() -> list[str]:
    return sorted(ARCHITECTURES.builtin_names())


def plugin_names() -> list[str]:
    """Architectures installed packages declare (``rcomp.architectures`` entry points)."""
    return sorted(ARCHITECTURES.plugin_names())


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def list_models() -> list[str]:
    """Every registered name: built-ins first, then plugins, then torchvision classification models."""
    return builtin_names() + plugin_names() + torchvision_names()


def default_input_shape(name: str) -> tuple[int, int, int]:
    if not is_user_factory(name) and name in ARCHITECTURES:
        return tuple(ARCHITECTURES.get(name).get("input", DEFAULT_INPUT))  # type: ignore[return-value]
    src = prefix_source(name)
    if src is None:
        return DEFAULT_INPUT
    if src.get("pretrained_input"):  # e.g. timm's pretrained config (rcomp.models.timm_source)
        from rcomp.catalog import Entry

        found = Entry("pretrained_input", src.get("pretrained_input")).load()(name)
        if found:
            return tuple(found[0])  # type: ignore[return-value]
    return tuple(src.get("input", DEFAULT_INPUT))  # type: ignore[return-value]


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
    """Build the bare network (no normalisation) for ``arch``, from the first source of
    :data:`rcomp.models.catalog.SOURCES` that owns its name."""
    name, kwargs = arch.name, dict(arch.kwargs)
    src = prefix_source(name)
    if src is not None:  # a known source such as timm:NAME: imports that library only
        return src.load()(name, spec, num_classes, kwargs)
    if not is_user_factory(name) and name in ARCHITECTURES:  # built-ins, then installed plugins
        fn = ARCHITECTURES.load(name)
        try:
            return fn(spec, num_classes, **kwargs)
        except TypeError as exc:
            raise RcompError(_bad_kwargs(name, kwargs, exc)) from exc
    if is_user_factory(name):
        return build_user_factory(name, spec, num_classes, allow_factory=allow_factory, trust_factory=trust_factory,
                                  **kwargs)
    return build_torchvision(name, spec, num_classes, **kwargs)


def _bad_kwargs(name: str, kwargs: dict, exc: TypeError) -> str:
    """One line for arguments a built-in architecture refused (from --arch-kwargs or a checkpoint's
    metadata), naming the key; never Python's own text."""
    import re

    text, fix = str(exc), "check --arch-kwargs (or the checkpoint's architecture record)"
    m = re.search(r"multiple values for (?:keyword )?argument '(\w+)'", text)
    if m and m.group(1) in kwargs:
        return (f"bad arguments for architecture {name}: {m.group(1)!r} follows from the data (input shape and "
                f"classes), it cannot be given as an argument; drop it and use --input-shape or the dataset")
    m = re.search(r"unexpected keyword argument '(\w+)'", text)
    if m and m.group(1) in kwargs:
        return f"bad arguments for architecture {name}: it takes no option {m.group(1)!r}; {fix}"
    return (f"bad arguments for architecture {name}: {printable(kwargs, 120)} holds a value of the wrong type "
            f"or lacks one; {fix}")


def build_user_factory(name: str, spec: InputSpec, num_classes: int, *, allow_factory: str | None = None,
                       trust_factory: bool = False, **kwargs):
    """``package.module:factory``, imported only when the user named it (or trusts the file)."""
    _check_user_factory(name, allow_factory, trust_factory)
    mod_name, fn_name = name.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise RcompError(f"cannot import {mod_name} for --arch {name}: {exc}; is it on PYTHONPATH?") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        plain = (f"; torchvision's models are named without a prefix: --arch {fn_name}"
                 if mod_name == "torchvision" and fn_name in torchvision_names() else "")
        raise RcompError(f"{mod_name} has no callable {fn_name!r} (from --arch {name}){plain}")
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


def build_torchvision(name: str, spec: InputSpec, num_classes: int, **kwargs):
    """A torchvision classification model by name, random weights."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise RcompError(f"unknown architecture {printable(repr(name), 80)}; choose one of `rcomp info --models` or package.module:factory")
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        import difflib

        close = difflib.get_close_matches(name, builtin_names() + plugin_names() + tvm.list_models(module=tvm), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RcompError(f"unknown architecture {printable(repr(name), 80)}{hint}; see `rcomp info --models`")
    if spec.channels != 3:
        raise RcompError(
            f"torchvision model {name} takes 3-channel images; use --input-shape 3,H,W "
            "(grey datasets are repeated to RGB automatically)"
        )
    try:
        return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise RcompError(_bad_kwargs(name, kwargs, exc)) from exc
    except ValueError as exc:
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
    if not is_user_factory(name):  # sizes checked on the meta device first (a user's factory is built as is)
        from rcomp.models.checks import check_fresh_build

        check_fresh_build(name, arch.kwargs, lambda: build_net(arch, spec, num_classes))
    net = build_net(arch, spec, num_classes, allow_factory=name, trust_factory=trust_factory)
    meta = CheckpointMeta(arch=arch, input=spec, num_classes=num_classes, class_names=class_names, dataset=dataset)
    return Classifier(net, meta)


def fresh_like(meta: CheckpointMeta, **kw):
    """A freshly built (unpruned, random) Classifier of the same architecture as ``meta``."""
    from rcomp.models.wrapper import Classifier

    net = build_net(meta.arch, meta.input, meta.num_classes, **kw)
    return Classifier(net, replace(meta, compression={}, history=list(meta.history)))
