"""Evasion attacks on [0, 1] images with eps in pixel units, and their registry.

>>> from rcomp.attacks import make_attack
>>> pgd = make_attack("pgd", eps=8 / 255, steps=10)          # doctest: +SKIP
>>> x_adv = pgd(model, x, y)                                   # doctest: +SKIP

Attacks: ``fgsm`` (Goodfellow et al. 2015), ``pgd`` (Madry et al. 2018), ``apgd`` (Croce and
Hein 2020), ``apgd-t`` (multi-target APGD, Croce and Hein 2020), ``cw`` (PGD on the
Carlini-Wagner margin loss) and ``square`` (black box, Andriushchenko et al. 2020); the suite
``auto`` (AutoAttack's standard suite as a cascade, :mod:`rcomp.attacks.auto`). See
:mod:`rcomp.attacks.base` for the guarantees every attack gives.
"""

from __future__ import annotations

import difflib
from typing import Any

from rcomp.attacks.apgd import APGD
from rcomp.attacks.apgd_t import APGDT
from rcomp.attacks.auto import AutoAttack
from rcomp.attacks.base import LOSSES, NORMS, Attack
from rcomp.attacks.cw import CW
from rcomp.attacks.fgsm import FGSM
from rcomp.attacks.pgd import PGD
from rcomp.attacks.square import Square
from rcomp.errors import RcompError

#: attack name -> class
ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "apgd": APGD, "apgd-t": APGDT, "cw": CW,
                                    "square": Square}

#: suite name -> class (a suite is an attack made of stages, run as a cascade)
SUITES: dict[str, type[Attack]] = {"auto": AutoAttack}

#: one line per attack, for help texts and listings
DESCRIPTIONS = {
    "fgsm": "one signed-gradient step (Goodfellow et al. 2015); no steps",
    "pgd": "projected gradient descent (Madry et al. 2018); steps 10, alpha 2.5*eps/steps, random start",
    "apgd": "step-size-free APGD (Croce and Hein 2020), --loss ce or dlr; steps 100",
    "apgd-t": "APGD on the targeted DLR loss against the 9 nearest classes in turn (Croce and Hein 2020); steps 100",
    "cw": "PGD on the Carlini-Wagner margin loss; steps 30, alpha 2.5*eps/steps",
    "square": "score-based black box, forward passes only (Andriushchenko et al. 2020); 5000 queries",
    "auto": "AutoAttack's standard suite as a cascade: apgd-ce, apgd-t (4 nearest classes), square with 1000 "
            "queries; 3 restarts on surrogate gradients (Croce and Hein 2020)",
}

__all__ = ["ATTACKS", "APGD", "APGDT", "CW", "DESCRIPTIONS", "FGSM", "LOSSES", "NORMS", "PGD", "SUITES", "Attack",
           "AutoAttack", "Square", "make_attack"]


def make_attack(name: str, eps: float, norm: str = "linf", steps: int | None = None, alpha: float | None = None,
                random_start: bool | None = None, restarts: int | None = None, loss: str | None = None,
                targeted: bool = False, seed: int | None = None, **kw: Any) -> Attack:
    """Build attack (or suite) ``name`` with budget ``eps`` (pixel units) in ``norm``.

    ``None`` means the attack's own default: ``steps`` (pgd 10, cw 30, apgd and apgd-t 100; fgsm
    and square take none), ``alpha`` (pgd/cw ``2.5 * eps / steps``; fgsm ``eps``, or
    ``1.25 * eps`` with a random start; apgd adapts its own), ``random_start`` (on for pgd, cw,
    apgd; off for fgsm), ``loss`` (``ce``; ``cw`` for cw and square; ``dlr`` for apgd-t),
    ``restarts`` (1; for auto, 1 on exact gradients and 3 on surrogate ones, see
    :mod:`rcomp.attacks.auto`).
    Attack-specific keywords go through ``kw``: ``targets`` (apgd-t, auto), ``queries`` and
    ``p_init`` (square; ``queries`` also for auto). Options an attack does not take are refused
    with an :class:`~rcomp.errors.RcompError`, as are unknown names, norms and losses.
    """
    key = _check_common(name, norm, loss, steps, restarts)
    kw = _check_specific(key, kw)
    if key == "auto":
        return _query_based(key, eps, norm, steps, alpha, random_start, restarts, loss, targeted, seed, kw)
    restarts = 1 if restarts is None else restarts
    common = {"targeted": targeted, "seed": seed}
    if key == "fgsm":
        if steps not in (None, 1):
            raise RcompError("fgsm takes a single step; drop --steps or use pgd")
        if restarts != 1:
            raise RcompError("fgsm has no restarts; drop --restarts or use pgd")
        return FGSM(eps, norm, alpha=alpha, random_start=bool(random_start), loss=loss or "ce", **common, **kw)
    if key in ("apgd", "apgd-t"):
        if alpha is not None:
            raise RcompError(f"{key} adapts its own step size; drop --alpha")
        cls, default_loss = (APGD, "ce") if key == "apgd" else (APGDT, "dlr")
        return cls(eps, norm, steps=steps, restarts=restarts, loss=loss or default_loss,
                   random_start=True if random_start is None else random_start, **common, **kw)
    if key in ("square", "auto"):
        return _query_based(key, eps, norm, steps, alpha, random_start, restarts, loss, targeted, seed, kw)
    cls = ATTACKS[key]
    return cls(eps, norm, steps=steps, alpha=alpha, random_start=True if random_start is None else random_start,
               restarts=restarts, loss=loss, **common, **kw)


def _check_common(name: str, norm: str, loss: str | None, steps: int | None, restarts: int | None) -> str:
    key = str(name).strip().lower()
    known = [*ATTACKS, *SUITES]
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise RcompError(f"unknown attack {name!r}{hint}; choose one of {', '.join(known)}")
    if norm not in NORMS:
        raise RcompError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if loss is not None and loss not in LOSSES:
        raise RcompError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return key


#: attack-specific keywords -> the attacks that take them
_SPECIFIC = {"queries": ("square", "auto"), "p_init": ("square",), "targets": ("apgd-t", "auto")}


def _check_specific(key: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Drop attack-specific options left at None; refuse those given to an attack that does not take them."""
    kw = {k: v for k, v in kw.items() if not (k in _SPECIFIC and v is None)}
    for k in kw:
        if k in _SPECIFIC and key not in _SPECIFIC[k]:
            raise RcompError(f"{key} takes no {k}; only {' and '.join(_SPECIFIC[k])} do")
    return kw


def _query_based(key: str, eps: float, norm: str, steps: int | None, alpha: float | None, random_start: bool | None,
                 restarts: int | None, loss: str | None, targeted: bool, seed: int | None, kw: dict[str, Any]) -> Attack:
    """``square`` (random search, no steps or step size) and the ``auto`` suite."""
    if alpha is not None:
        raise RcompError(f"{key} takes no step size; drop --alpha")
    if random_start is False:
        raise RcompError(f"{key} always starts from its own initialisation; drop --no-random-start")
    if key == "square":
        if steps is not None:
            raise RcompError("square counts queries, not steps; drop --steps and set the query budget (queries=)")
        if restarts != 1:
            raise RcompError("square has no restarts; raise its query budget instead")
        return Square(eps, norm, loss=loss or "cw", targeted=targeted, seed=seed, **kw)
    if loss is not None or targeted:
        raise RcompError("auto picks its own losses and targets; drop --loss and --targeted")
    return AutoAttack(eps, norm, steps=steps, restarts=restarts, seed=seed, **kw)
