"""Evasion attacks on [0, 1] images with eps in pixel units.

>>> from rcomp.attacks import make_attack
>>> pgd = make_attack("pgd", eps=8 / 255, steps=10)          # doctest: +SKIP
>>> x_adv = pgd(model, x, y)                                   # doctest: +SKIP

The attacks are listed once, in :data:`rcomp.attacks.catalog.ATTACKS` (``rcomp info --attacks``):
``fgsm``, ``pgd``, ``apgd``, ``apgd-t``, ``cw``, ``square`` and the suite ``auto`` (AutoAttack's
standard suite as a cascade, :mod:`rcomp.attacks.auto`), plus any attack an installed package
declares in the ``rcomp.attacks`` entry-point group. See :mod:`rcomp.attacks.base` for the
guarantees every attack gives. Importing this package imports no torch; the attack classes
(``rcomp.attacks.PGD`` ...) load on first use.
"""

from __future__ import annotations

from typing import Any

from rcomp.attacks.catalog import ATTACKS, LOSSES, NORMS, OPTIONS
from rcomp.errors import RcompError

__all__ = ["ATTACKS", "APGD", "APGDT", "CW", "FGSM", "LOSSES", "NORMS", "PGD", "Attack", "AutoAttack", "Square",
           "make_attack", "taken_options"]

_CLASSES = {"APGD": "rcomp.attacks.apgd", "APGDT": "rcomp.attacks.apgd_t", "AutoAttack": "rcomp.attacks.auto",
            "Attack": "rcomp.attacks.base", "CW": "rcomp.attacks.cw", "FGSM": "rcomp.attacks.fgsm",
            "PGD": "rcomp.attacks.pgd", "Square": "rcomp.attacks.square"}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'rcomp.attacks' has no attribute {name!r}")


_UNSET: dict[str, Any] = {"targeted": False}  # what "not given" looks like for options that are not None


def _given(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if v is not None and _UNSET.get(k, None) != v}


def taken_options(name: str, opts: dict[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    """The options of ``opts`` that attack ``name`` takes (None and unset values dropped).

    An option it does not take is refused with the entry's message, unless it equals the one value
    the entry accepts (fgsm's ``steps=1``); with ``lenient`` (several attacks share one set of
    options) it is left out instead."""
    entry = ATTACKS.get(name)
    unknown = [k for k in opts if k not in OPTIONS]
    if unknown:
        raise RcompError(f"{entry.name} got unknown option {unknown[0]!r}; attacks take {', '.join(OPTIONS)}")
    fixed = entry.get("fixed", {})
    out = {}
    for k, v in _given(opts).items():
        if k in entry.takes:
            out[k] = v
        elif lenient or fixed.get(k, _UNSET) == v:
            continue
        else:
            note = entry.get("refusal", {}).get(k)
            if note:
                raise RcompError(note.format(name=entry.name, value=v))
            takers = [e.name for e in ATTACKS.entries(plugins=False) if k in e.takes]
            raise RcompError(f"{entry.name} takes no {k}; "
                             + (f"only {' and '.join(takers)} do" if takers else f"drop --{k.replace('_', '-')}"))
    return out


def make_attack(name: str, eps: float, norm: str = "linf", steps: int | None = None, alpha: float | None = None,
                random_start: bool | None = None, restarts: int | None = None, loss: str | None = None,
                targeted: bool = False, seed: int | None = None, **kw: Any):
    """Build attack (or suite) ``name`` with budget ``eps`` (a float, pixel units) in ``norm``.

    ``None`` means the attack's own default: ``steps`` (pgd 10, cw 30, apgd and apgd-t 100; fgsm
    and square take none), ``alpha`` (pgd/cw ``2.5 * eps / steps``; fgsm ``eps``, or
    ``1.25 * eps`` with a random start; apgd adapts its own), ``random_start`` (on for pgd, cw,
    apgd; off for fgsm), ``loss`` (``ce``; ``cw`` for cw and square; ``dlr`` for apgd-t),
    ``restarts`` (1; for auto, 1 on exact gradients and 3 on surrogate ones, see
    :mod:`rcomp.attacks.auto`).
    Attack-specific keywords go through ``kw``: ``targets`` (apgd-t, auto), ``queries`` and
    ``p_init`` (square; ``queries`` also for auto). Options an attack does not take (its catalogue
    entry's ``takes``) are refused with an :class:`~rcomp.errors.RcompError`, as are unknown names,
    norms and losses. ``lenient=True`` leaves them out instead.
    """
    lenient = bool(kw.pop("lenient", False))
    entry = ATTACKS.get(name)
    if norm not in NORMS:
        raise RcompError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if loss is not None and loss not in LOSSES:
        raise RcompError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    opts = taken_options(entry.name, {"steps": steps, "alpha": alpha, "random_start": random_start,
                                      "restarts": restarts, "loss": loss, "targeted": targeted, **kw},
                         lenient=lenient)
    return entry.load()(eps, norm, seed=seed, **opts)
