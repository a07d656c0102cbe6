"""Architectures and where they come from, listed once (no torch).

:data:`ARCHITECTURES` holds rcomp's own architectures (``convnet8``, ``resnet18-cifar``, ``mlp``)
and the ones installed packages declare in the ``rcomp.architectures`` entry-point group; an
entry's ``ref`` names ``factory(spec, num_classes, **kwargs) -> nn.Module`` (``spec`` an
:class:`~rcomp.spec.InputSpec`) and ``extra["input"]`` its default input shape.

:data:`SOURCES` lists the kinds of architecture names :func:`rcomp.models.registry.build_net`
understands, in the order it tries them. A source with ``extra["prefix"]`` owns the names written
``PREFIX:NAME`` (``timm:resnet18``, :mod:`rcomp.models.timm_source`): its ``ref`` names
``build(name, spec, num_classes, kwargs)`` (``name`` with its prefix), its optional ``extra["names"]``
a ``"module:function"`` listing the names it knows (for ``rcomp info --models``),
``extra["pretrained_input"]`` one returning ``(shape, mean, std, tag)`` or None for a name, and
``extra["input"]`` the default input shape. Adding a source is one module plus one entry here.
"""

from __future__ import annotations

from rcomp.catalog import Catalogue, Entry

ARCHITECTURES = Catalogue("architecture", [
    Entry("convnet8", "rcomp.models.builtin:convnet8", "the study's 8-layer CNN",
          "Thorsteinsson et al., arXiv 2403.09441 (2024)", extra={"input": (1, 28, 28)}),
    Entry("resnet18-cifar", "rcomp.models.builtin:resnet18_cifar",
          "ResNet-18 with a 3x3 stride-1 stem, no max-pool (CIFAR)", "He et al., CVPR 2016",
          extra={"input": (3, 32, 32)}),
    Entry("mlp", "rcomp.models.builtin:mlp", "small MLP, flatten + hidden=(128,) (tests, tabular-sized images)", "",
          extra={"input": (1, 8, 8)}),
], group="rcomp.architectures", flag="--arch", listing="rcomp info --models")

SOURCES = Catalogue("architecture source", [
    Entry("builtin", "rcomp.models.catalog:ARCHITECTURES", "rcomp's own architectures and installed "
          "rcomp.architectures plugins, by name", extra={"form": "NAME"}),
    Entry("factory", "rcomp.models.registry:build_user_factory", "your own model as package.module:factory, "
          "imported only when named on the command line", extra={"form": "package.module:factory"}),
    Entry("timm", "rcomp.models.timm_source:build", "any timm model as timm:NAME, built without downloading "
          "weights (the optional extra rcomp[timm])", "Wightman, PyTorch Image Models",
          extra={"form": "timm:NAME", "prefix": "timm", "names": "rcomp.models.timm_source:names",
                 "pretrained_input": "rcomp.models.timm_source:pretrained_input", "input": (3, 224, 224)}),
    Entry("torchvision", "rcomp.models.registry:build_torchvision", "any torchvision classification model by "
          "its name (random weights)", extra={"form": "NAME", "input": (3, 224, 224),
                                              "names": "rcomp.models.registry:torchvision_names"}),
])

#: the default input shape of a name no source gives one for
DEFAULT_INPUT = (3, 224, 224)


def is_user_factory(name: str) -> bool:
    """Whether ``name`` is a ``package.module:factory`` (code the user names), not ``PREFIX:NAME`` of a
    registered source (``timm:resnet18``)."""
    return ":" in str(name) and prefix_source(name) is None


def user_factory_from_file(value) -> str | None:
    """``file_check`` of the options naming an architecture: a file may name a registered source's model
    (``timm:NAME``) but not a user factory, which runs code."""
    if is_user_factory(str(value)):
        return ("a user factory runs code, so only the command line may name it "
                "(recipes: pass --allow-factory with the same name to rcomp run)")
    return None


def prefix_source(name: str) -> Entry | None:
    """The source owning ``PREFIX:NAME`` names, if ``name`` is written so and the prefix is registered."""
    prefix, sep, _ = str(name).partition(":")
    if not sep:
        return None
    for e in SOURCES.builtin.values():
        if e.get("prefix") == prefix:
            return e
    return None
