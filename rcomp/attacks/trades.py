"""TRADES' inner maximisation: PGD on ``KL(p(x) || p(x'))`` from a small Gaussian start.

Zhang, Yu, Jiao, Xing, El Ghaoui and Jordan, "Theoretically Principled Trade-off between
Robustness and Accuracy", ICML 2019. The adversarial image maximises the divergence of the
model's prediction from its own clean prediction (no label is used); training then minimises
``CE(clean) + beta * KL`` (:mod:`rcomp.train.adversarial`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rcomp.attacks.base import kl_loss, project
from rcomp.attacks.pgd import PGD


class TradesKL(PGD):
    """PGD (last iterate) on :func:`~rcomp.attacks.base.kl_loss` to the clean prediction.

    Start ``x + 0.001 * N(0, 1)`` projected onto the ball (TRADES' reference code); steps and
    ``alpha`` as :class:`~rcomp.attacks.pgd.PGD` (default 10 steps of ``2.5 * eps / steps``).
    """

    name = "trades-kl"
    paper = "Zhang et al. 2019"

    def __init__(self, eps: float, norm: str = "linf", *, steps: int | None = None, alpha: float | None = None,
                 seed: int | None = None):
        super().__init__(eps, norm, steps=steps, alpha=alpha, seed=seed, keep_last=True)
        self.loss = "kl"
        self._p_clean: torch.Tensor | None = None

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            self._p_clean = F.softmax(model(x), dim=1)
        try:
            return self._run(model, x, y, None, 0)[0]
        finally:
            self._p_clean = None

    def random_start(self, x: torch.Tensor, restart: int = 0) -> torch.Tensor:
        g = self.generator(x.device, stream=restart + 1)
        delta = 0.001 * torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
        return project(x, x + delta, self.eps, self.norm)

    def objective(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return kl_loss(logits, self._p_clean)

    def _extra_params(self) -> dict[str, Any]:
        return {"steps": self.steps, "alpha": self.alpha, "random_start": "gauss 0.001", "restarts": 1}
