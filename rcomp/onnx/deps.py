"""The optional ONNX extra, checked in one place: one line naming what to install."""

from __future__ import annotations

import importlib
import importlib.util

from rcomp.errors import RcompError

EXTRA = "pip install 'rcomp[onnx]'"
#: module -> what it is needed for
NEEDED = {"onnx": "reading and writing ONNX files", "onnxruntime": "running them",
          "onnxscript": "the torch.export-based exporter"}


def require(what: str, modules: tuple[str, ...] = ("onnx", "onnxruntime")):
    """Import ``modules`` or refuse in one line: ``WHAT needs onnx, onnxruntime (not installed): pip install ...``."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RcompError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                         f"installed; install the ONNX extra: {EXTRA}")


def installed(modules: tuple[str, ...]) -> bool:
    """Whether every module of ``modules`` is installed, without importing them (onnxscript alone takes 1.5 s
    to import): for deciding whether to plan stages that need them; those stages still :func:`require` them."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in modules)
    except (ImportError, ValueError):
        return False
