"""Evasion attacks on [0, 1] images with eps in pixel units, and their registry.

>>> from rcomp.attacks import make_attack
>>> pgd = make_attack("pgd", eps=8 / 255, steps=10)          # doctest: +SKIP
>>> x_adv = pgd(model, x, y)                                   # doctest: +SKIP

Attacks: ``fgsm`` (Goodfellow et al. 2015), ``pgd`` (Madry et al. 2018), ``apgd`` (Croce and
Hein 2020) and ``cw`` (PGD on the Carlini-Wagner margin loss). See :mod:`rcomp.attacks.base`
for the guarantees every attack gives.
"""

from __future__ import annotations

import difflib
from typing import Any

from rcomp.attacks.apgd import APGD
from rcomp.attacks.base import LOSSES, NORMS, Attack
from rcomp.attacks.cw import CW
from rcomp.attacks.fgsm import FGSM
from rcomp.attacks.pgd import PGD
from rcomp.errors import RcompError

#: attack name -> class
ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "apgd": APGD, "cw": CW}

#: one line per attack, for help texts and listings
DESCRIPTIONS = {
    "fgsm": "one signed-gradient step (Goodfellow et al. 2015); no steps",
    "pgd": "projected gradient descent (Madry et al. 2018); steps 10, alpha 2.5*eps/steps, random start",
    "apgd": "step-size-free APGD (Croce and Hein 2020), --loss ce or dlr; steps 100",
    "cw": "PGD on the Carlini-Wagner margin loss; steps 30, alpha 2.5*eps/steps",
}

__all__ = ["ATTACKS", "APGD", "CW", "DESCRIPTIONS", "FGSM", "LOSSES", "NORMS", "PGD", "Attack", "make_attack"]


def make_attack(name: str, eps: float, norm: str = "linf", steps: int | None = None, alpha: float | None = None,
                random_start: bool | None = None, restarts: int = 1, loss: str | None = None,
                targeted: bool = False, seed: int | None = None, **kw: Any) -> Attack:
    """Build attack ``name`` with budget ``eps`` (pixel units) in ``norm``.

    ``None`` means the attack's own default: ``steps`` (pgd 10, cw 30, apgd 100; fgsm takes
    none), ``alpha`` (pgd/cw ``2.5 * eps / steps``; fgsm ``eps``, or ``1.25 * eps`` with a
    random start; apgd adapts its own), ``random_start`` (on for pgd, cw, apgd; off for fgsm),
    ``loss`` (``ce``; ``cw`` for cw). Options an attack does not take are refused with an
    :class:`~rcomp.errors.RcompError`, as are unknown names, norms and losses.
    """
    key = str(name).strip().lower()
    if key not in ATTACKS:
        close = difflib.get_close_matches(key, list(ATTACKS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise RcompError(f"unknown attack {name!r}{hint}; choose one of {', '.join(ATTACKS)}")
    if norm not in NORMS:
        raise RcompError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if loss is not None and loss not in LOSSES:
        raise RcompError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if steps is not None and (isinstance(steps, bool) or int(steps) < 1):
        raise RcompError(f"--steps must be at least 1, got {steps}")
    if restarts is None or int(restarts) < 1:
        raise RcompError(f"--restarts must be at least 1, got {restarts}")
    common = {"targeted": targeted, "seed": seed}
    if key == "fgsm":
        if steps not in (None, 1):
            raise RcompError("fgsm takes a single step; drop --steps or use pgd")
        if restarts != 1:
            raise RcompError("fgsm has no restarts; drop --restarts or use pgd")
        return FGSM(eps, norm, alpha=alpha, random_start=bool(random_start), loss=loss or "ce", **common, **kw)
    if key == "apgd":
        if alpha is not None:
            raise RcompError("apgd adapts its own step size; drop --alpha")
        return APGD(eps, norm, steps=steps, restarts=restarts, loss=loss or "ce",
                    random_start=True if random_start is None else random_start, **common, **kw)
    cls = ATTACKS[key]
    return cls(eps, norm, steps=steps, alpha=alpha, random_start=True if random_start is None else random_start,
               restarts=restarts, loss=loss, **common, **kw)
