"""APGD-T: APGD on the targeted DLR loss, run against the top-k other classes in turn.

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (section 4, APGD-T; reference ``fra31/auto-attack``,
``APGDAttack_targeted``): for target ``t`` in the ``k`` classes with the highest clean logits
(``k = 9`` or ``classes - 1``), maximise ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` with
APGD and count a point as fooled as soon as it is misclassified (as the reference does).

Cost savings that keep the strength (the idea of the minimum-margin attack of Gao et al., "Fast
and Reliable Evaluation of Adversarial Robustness with Minimum-Margin Attack", ICML 2022): the
targets are tried in increasing order of their clean logit margin ``z_y - z_t`` (the nearest
class first), and each target runs only on the points no earlier target fooled (early exit per
point), so the later, rarely useful targets cost little.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rcomp.attacks.apgd import APGD
from rcomp.attacks.pointwise import PointwiseStart
from rcomp.errors import RcompError

_STREAMS = 1024  # random streams per restart (more when a model has more classes)


class APGDT(PointwiseStart, APGD):
    """Multi-target APGD (APGD-T). Defaults: ``steps=100``, ``targets=9`` (capped at
    ``classes - 1``), ``restarts=1`` per target, ``loss="dlr"`` (the targeted DLR loss; ``ce`` and
    ``cw`` are used in their targeted forms), ``rho=0.75``, random start on. Costs up to
    ``targets * restarts * (steps + 1)`` forward+backward passes per point, fewer for points
    fooled early. Returns the first example that fooled the model, else the highest-loss iterate
    of the first target.

    With ``targeted=True`` (or ``target=`` on call) it attacks that one target only and success
    means reaching it, as :class:`~rcomp.attacks.apgd.APGD` with ``targeted=True``. Random
    starts are drawn per point (:mod:`rcomp.attacks.pointwise`): a point's example does not
    depend on the batch it comes in.
    """

    name = "apgd-t"
    paper = "Croce and Hein 2020 (APGD-T); target order by margin after Gao et al. 2022"

    def __init__(self, eps: float, norm: str = "linf", *, targets: int | None = None, loss: str = "dlr", **kw: Any):
        super().__init__(eps, norm, loss=loss, **kw)
        targets = 9 if targets is None else targets
        if isinstance(targets, bool) or int(targets) < 1:
            raise RcompError(f"apgd-t needs at least 1 target class, got {targets}")
        self.targets = int(targets)

    def _extra_params(self) -> dict[str, Any]:
        return {**super()._extra_params(), "targets": self.targets, "target_order": "clean logit margin"}

    def succeeded(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        # multi-target mode: the target only shapes the loss; any misclassification counts
        if self.targeted and target is not None:
            return logits.argmax(1) == target
        return logits.argmax(1) != y

    def check_classes(self, logits: torch.Tensor) -> None:
        if self.loss == "dlr" and logits.shape[1] < 4:
            raise RcompError(f"{self.name}: the targeted dlr loss needs at least 4 classes, the model has "
                             f"{logits.shape[1]}; use --loss ce")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        if target is not None:
            return super().perturb(model, x, y, target)
        with torch.no_grad():
            logits = model(x)
        self.check_classes(logits)
        k = min(self.targets, logits.shape[1] - 1)
        order = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, :k]
        best = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        runs = self.runs()
        for i in range(k):
            for r in range(runs):
                idx = (~done).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return best
                # restart r of target i draws stream i + r * 1024: more restarts repeat the runs with fewer
                adv, ok = self._run(model, x[idx], y[idx], order[idx, i], i + r * max(k, _STREAMS))
                keep = ok | (i == 0 and r == 0)
                best[idx[keep]] = adv[keep]
                done[idx] = ok
        return best
