"""Cascaded evaluation and the gradient-masking check, one batch at a time.

Cascade (Croce and Hein 2020, AutoAttack): each attack runs only on the points every earlier
attack failed on, so the final figure is the per-example worst case over the attacks, at a cost
that shrinks with every stage. Independent mode runs every attack on every point correct clean
(per-attack numbers). Either way the robust accuracy after each stage (the worst case over the
attacks so far, in order) is recorded.

Gradient-masking check (Athalye, Carlini and Wagner, "Obfuscated Gradients Give a False Sense of
Security", ICML 2018): a gradient-free attack (``uses_gradients = False``, e.g. Square) that fools
points that every gradient attack was run on and missed means the gradients mislead the
attacks -- masked, or a poor surrogate, as for quantized models. The count is only defined when
a gradient-free attack ran on points after gradient attacks did.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rcomp.attacks.cascade import BatchBook, uses_gradients  # noqa: F401 - re-exported


def expand_suites(attacks: Mapping[str, Any]) -> dict[str, Any]:
    """Replace every suite (an attack with ``stages``, e.g. ``auto``) by its stages: key ``auto``
    becomes ``apgd-ce``, ``apgd-t``, ``square``; ``auto@8/255`` becomes ``apgd-ce@8/255``..."""
    out: dict[str, Any] = {}
    for key, attack in attacks.items():
        stages = getattr(attack, "stages", None)
        if not stages:
            out[key] = attack
            continue
        suffix = key[len(attack.name):] if key.startswith(attack.name) else f"/{key}"
        for stage, a in stages.items():
            out[f"{stage}{suffix}"] = a
    return out


def wants_cascade(attacks: Mapping[str, Any], cascade: bool) -> bool:
    """On when asked for, and always for a suite (``auto`` is a cascade by definition; to run its
    stages independently, build them with ``auto_stages(..., as_suite=False)``)."""
    return bool(cascade) or any(getattr(a, "suite", None) or getattr(a, "stages", None) for a in attacks.values())


def masking_checkable(attacks: Mapping[str, Any], cascade: bool) -> bool:
    """Whether some gradient-free attack gets to run on points the gradient attacks all missed."""
    kinds = [uses_gradients(a) for a in attacks.values()]
    if not any(kinds) or all(kinds):
        return False
    return not cascade or any(not k and any(kinds[:i]) for i, k in enumerate(kinds))
