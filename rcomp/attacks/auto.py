"""``auto``: AutoAttack's standard suite, run as a cascade.

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. The standard suite is APGD-CE, APGD-T, FAB-T and Square,
each run only on the points every earlier attack failed on, so a non-robust model costs little.

rcomp's stages and defaults:

* ``apgd-ce``: :class:`~rcomp.attacks.apgd.APGD`, cross-entropy, 100 steps, 1 restart;
* ``apgd-t``: :class:`~rcomp.attacks.apgd_t.APGDT`, targeted DLR, 100 steps, **the 4 nearest
  classes** by clean logit margin (the reference tries 9; ``targets=9`` restores it), tried
  nearest first, early exit per point. The minimum-margin attack (Gao et al., ICML 2022) showed
  the nearest classes carry nearly all of APGD-T's success; on the five digits models of
  ``benchmarks/bench_autoattack.py`` (standard, PGD-trained, pruned, simulated int4, real int8;
  seeds 0-3 on the standard model, 0-1 on the others) targets 5-9 fooled no point the first four
  missed on exact gradients, and on points that resist 4 targets cost 4/9 of 9;
* **surrogate gradients** (a simulated low-bit model's straight-through rounding, an int8
  model's fake-quant twin): both APGD stages run :data:`SURROGATE_RESTARTS` random restarts
  instead of 1, unless ``restarts`` is given. On a piecewise-constant model a point's fate
  depends on its random start: on the simulated int4 model the points by which ``auto`` trailed
  torchattacks fell to either library's APGD-T in only a few of 12 seeds, and 3 restarts of 4
  targets read 0.5-2.0 points lower than 1 restart of 9 targets on every seed measured (0-3).
  The run says so on stderr, and the parameters record it;
* ``square``: :class:`~rcomp.attacks.square.Square`, **1000 queries** (the reference is 5000;
  ``queries=5000`` restores it), ``p_init`` 0.8, on the real model's forward pass only. On the four
  digits models of ``benchmarks/bench_autoattack.py`` Square after APGD-T fooled no further point at
  either budget, the final figures were identical, and 1000 queries cut ``auto``'s time by 55-60%
  (Square had been 60-70% of it).

Every APGD run drops a point from its batch as soon as it is fooled, so a point costs passes
only while it resists.

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

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rcomp.attacks.apgd import APGD
from rcomp.attacks.apgd_t import APGDT
from rcomp.attacks.base import Attack, eval_mode
from rcomp.attacks.cascade import BatchBook
from rcomp.attacks.pointwise import PointwiseStart
from rcomp.attacks.square import Square
from rcomp.errors import RcompError

#: stage names of the suite, in cascade order
STAGES = ("apgd-ce", "apgd-t", "square")


class PointwiseAPGD(PointwiseStart, APGD):
    """APGD with per-point random starts (:mod:`rcomp.attacks.pointwise`), as the other stages."""


#: Square's query budget inside ``auto`` (the stand-alone ``square`` attack keeps the reference 5000)
SQUARE_QUERIES = 1000
#: APGD-T's target classes inside ``auto``, nearest by clean margin (the stand-alone ``apgd-t`` keeps 9)
APGDT_TARGETS = 4
#: restarts of the APGD stages when the model's gradients are a surrogate (straight-through
#: rounding, a fake-quant twin) and the caller gave none; 1 on exact gradients
SURROGATE_RESTARTS = 3


def auto_stages(eps: float, norm: str = "linf", *, steps: int | None = None, restarts: int | None = None,
                targets: int | None = None, queries: int | None = None, seed: int | None = None,
                as_suite: bool = True) -> dict[str, Attack]:
    """The suite's attacks, ``{stage name: attack}`` in cascade order, all with ``seed``. With
    ``as_suite`` each has ``suite = "auto"``, so :func:`rcomp.evaluation.robustness.evaluate`
    cascades them; without, they are plain attacks (run independently unless ``cascade=True``).
    ``restarts=None``: 1 on exact gradients, :data:`SURROGATE_RESTARTS` on surrogate ones."""
    runs = {"restarts": 1, "surrogate_restarts": SURROGATE_RESTARTS} if restarts is None else {"restarts": restarts}
    stages: dict[str, Attack] = {
        "apgd-ce": PointwiseAPGD(eps, norm, steps=steps, loss="ce", seed=seed, **runs),
        "apgd-t": APGDT(eps, norm, steps=steps, targets=APGDT_TARGETS if targets is None else targets, seed=seed,
                        **runs),
        "square": Square(eps, norm, queries=SQUARE_QUERIES if queries is None else queries, seed=seed),
    }
    for a in stages.values() if as_suite else ():
        a.suite = "auto"  # type: ignore[attr-defined]
    return stages


def surrogate_note(attacks: Mapping[str, Any], gradient_source: str) -> str | None:
    """The line to show when attacks of ``attacks`` will run more restarts because the model's
    gradients (``gradient_source``) are a surrogate; None when none will."""
    if gradient_source == "exact":
        return None
    runs = sorted({a.surrogate_restarts for a in attacks.values() if getattr(a, "surrogate_restarts", None)})
    if not runs:
        return None
    return (f"auto: this model's gradients are a surrogate ({gradient_source}), so its APGD stages run "
            f"{'/'.join(map(str, runs))} random restarts instead of 1 (--restarts sets them)")


def cascade_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: dict[str, Attack]) -> torch.Tensor:
    """Run ``attacks`` in order, each only on the points no earlier one fooled (scored on ``model``
    itself); per point, the first example that fooled it, else the last attack's example. The
    bookkeeping is the evaluation loop's (:class:`~rcomp.attacks.cascade.BatchBook`)."""
    book = BatchBook(torch.ones(x.shape[0], dtype=torch.bool, device=x.device), True, x)
    for stage, attack in enumerate(attacks.values()):
        idx = book.pool()
        if idx.numel() == 0:
            break
        adv = attack(model, x[idx], y[idx])
        with torch.inference_mode(), eval_mode(model):
            robust = model(adv).argmax(1) == y[idx]
        book.record(attack, stage, idx, robust, adv)
    return book.kept


class AutoAttack(Attack):
    """The ``auto`` suite as one attack: ``attack(model, x, y)`` runs the cascade of :data:`STAGES`.

    Options: ``steps`` (APGD stages, default 100), ``restarts`` (APGD stages, default 1 on exact
    gradients, :data:`SURROGATE_RESTARTS` on surrogate ones), ``targets`` (APGD-T, default
    :data:`APGDT_TARGETS`), ``queries`` (Square, default :data:`SQUARE_QUERIES`), ``seed`` (shared by every
    stage). :attr:`stages` holds the stage attacks; evaluation expands them to report robust
    accuracy after each stage.
    """

    name = "auto"
    paper = "Croce and Hein 2020 (AutoAttack), run as a cascade"

    def __init__(self, eps: float, norm: str = "linf", *, steps: int | None = None, restarts: int | None = None,
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
