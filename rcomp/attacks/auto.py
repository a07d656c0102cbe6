"""``auto``: AutoAttack's standard suite, run as a cascade.

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. The standard suite is APGD-CE, APGD-T, FAB-T and Square,
each run only on the points every earlier attack failed on, so a non-robust model costs little.

rcomp's stages and defaults:

* ``apgd-ce``: :class:`~rcomp.attacks.apgd.APGD`, cross-entropy, 100 steps, 1 restart;
* ``apgd-t``: :class:`~rcomp.attacks.apgd_t.APGDT`, targeted DLR, 100 steps, 9 targets tried in
  order of clean logit margin (Gao et al. 2022), early exit per point;
* ``square``: :class:`~rcomp.attacks.square.Square`, **1000 queries** (the reference is 5000;
  ``queries=5000`` restores it), ``p_init`` 0.8, on the real model's forward pass only. On the four
  digits models of ``benchmarks/bench_autoattack.py`` Square after APGD-T fooled no further point at
  either budget, the final figures were identical, and 1000 queries cut ``auto``'s time by 55-60%
  (Square had been 60-70% of it).

Every stage draws its randomness per point (:mod:`rcomp.attacks.pointwise`), so a point meets
the same examples in a cascade as in independent runs: the cascade's final figure equals the
per-example worst case of the independent runs, for less work.

FAB-T is left out: it is a minimum-norm attack whose contribution at a fixed eps after APGD-T is
small in Croce and Hein's own ablations, while it costs a Jacobian per step and target. The
benchmark ``benchmarks/bench_autoattack.py`` checks that leaving it out costs no strength: it
compares ``auto`` with the per-example worst case over torchattacks' APGD-CE, APGD-T, FAB-T and
Square at their reference settings. Square comes last so that the points it alone fools are
those every gradient attack missed (the gradient-masking check of
:mod:`rcomp.evaluation.cascade`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rcomp.attacks.apgd import APGD
from rcomp.attacks.apgd_t import APGDT
from rcomp.attacks.base import Attack, eval_mode
from rcomp.attacks.pointwise import PointwiseStart
from rcomp.attacks.square import Square
from rcomp.errors import RcompError

#: stage names of the suite, in cascade order
STAGES = ("apgd-ce", "apgd-t", "square")


class PointwiseAPGD(PointwiseStart, APGD):
    """APGD with per-point random starts (:mod:`rcomp.attacks.pointwise`), as the other stages."""


#: Square's query budget inside ``auto`` (the stand-alone ``square`` attack keeps the reference 5000)
SQUARE_QUERIES = 1000


def auto_stages(eps: float, norm: str = "linf", *, steps: int | None = None, restarts: int = 1,
                targets: int | None = None, queries: int | None = None, seed: int | None = None,
                as_suite: bool = True) -> dict[str, Attack]:
    """The suite's attacks, ``{stage name: attack}`` in cascade order, all with ``seed``. With
    ``as_suite`` each has ``suite = "auto"``, so :func:`rcomp.evaluation.robustness.evaluate`
    cascades them; without, they are plain attacks (run independently unless ``cascade=True``)."""
    stages: dict[str, Attack] = {
        "apgd-ce": PointwiseAPGD(eps, norm, steps=steps, restarts=restarts, loss="ce", seed=seed),
        "apgd-t": APGDT(eps, norm, steps=steps, restarts=restarts, targets=targets, seed=seed),
        "square": Square(eps, norm, queries=SQUARE_QUERIES if queries is None else queries, seed=seed),
    }
    for a in stages.values() if as_suite else ():
        a.suite = "auto"  # type: ignore[attr-defined]
    return stages


def cascade_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: dict[str, Attack]) -> torch.Tensor:
    """Run ``attacks`` in order, each only on the points no earlier one fooled (scored on ``model``
    itself); per point, the first example that fooled it, else the last attack's example."""
    x_adv = x.detach().clone()
    alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for attack in attacks.values():
        idx = alive.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        adv = attack(model, x[idx], y[idx])
        with torch.inference_mode(), eval_mode(model):
            robust = model(adv).argmax(1) == y[idx]
        x_adv[idx] = adv
        alive[idx] = robust
    return x_adv


class AutoAttack(Attack):
    """The ``auto`` suite as one attack: ``attack(model, x, y)`` runs the cascade of :data:`STAGES`.

    Options: ``steps`` (APGD stages, default 100), ``restarts`` (APGD stages, default 1),
    ``targets`` (APGD-T, default 9), ``queries`` (Square, default :data:`SQUARE_QUERIES`), ``seed`` (shared by every
    stage). :attr:`stages` holds the stage attacks; evaluation expands them to report robust
    accuracy after each stage.
    """

    name = "auto"
    paper = "Croce and Hein 2020 (AutoAttack), run as a cascade"

    def __init__(self, eps: float, norm: str = "linf", *, steps: int | None = None, restarts: int = 1,
                 targets: int | None = None, queries: int | None = None, seed: int | None = None):
        super().__init__(eps, norm, seed=seed)
        self.stages = auto_stages(eps, norm, steps=steps, restarts=restarts, targets=targets, queries=queries,
                                  seed=self.seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 target: torch.Tensor | None = None) -> torch.Tensor:
        if target is not None:
            raise RcompError("auto is untargeted (its apgd-t stage picks its own targets); drop the target")
        return cascade_attack(model, x, y, self.stages)

    def reset(self) -> None:
        super().reset()
        for a in self.stages.values():
            a.reset()

    def params(self) -> dict[str, Any]:
        return {"attack": self.name, "eps": self.eps, "norm": self.norm, "seed": self.seed, "mode": "cascade",
                "stages": {k: a.params() for k, a in self.stages.items()}}
