"""Structured (channel) pruning with torch-pruning's dependency graph.

>>> import rcomp
>>> from rcomp.pruning import prune
>>> model = rcomp.load("model.safetensors")
>>> model, report = prune(model, ratio=0.5, method="l1")
>>> rcomp.save(model, "model.prune0.5.safetensors")   # reloads with no pickle
"""

from rcomp.pruning.pruner import METHODS, SCOPES, PruneReport, find_classifier, prune

__all__ = ["METHODS", "SCOPES", "PruneReport", "find_classifier", "prune"]
