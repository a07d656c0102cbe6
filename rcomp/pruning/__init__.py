"""Structured (channel) pruning with torch-pruning's dependency graph.

>>> import rcomp
>>> from rcomp.pruning import prune
>>> model = rcomp.load("model.safetensors")
>>> model, report = prune(model, ratio=0.5, method="l1")
>>> rcomp.save(model, "model.prune0.5.safetensors")   # reloads with no pickle

The importances (``method``) are listed in :data:`rcomp.pruning.catalog.IMPORTANCES`. Importing this
package imports no torch; :func:`prune` and the rest load on first use.
"""

from __future__ import annotations

from typing import Any

from rcomp.pruning.catalog import IMPORTANCES, SCOPES

__all__ = ["IMPORTANCES", "SCOPES", "PruneReport", "find_classifier", "prune"]


def __getattr__(name: str) -> Any:
    if name in ("PruneReport", "find_classifier", "prune"):
        from rcomp.pruning import pruner

        return getattr(pruner, name)
    raise AttributeError(f"module 'rcomp.pruning' has no attribute {name!r}")
