"""FGSM: one gradient step to the edge of the eps ball.

Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
With ``random_start=True`` it is the "FGSM with random initialisation" of Wong, Rice and Kolter,
"Fast is better than free: revisiting adversarial training", ICLR 2020 (step 1.25 * eps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rcomp.attacks.base import Attack, ascent_direction, project
from rcomp.errors import RcompError


class FGSM(Attack):
    """``x + eps * sign(grad)`` (linf) or ``x + eps * grad / ||grad||_2`` (l2, the fast gradient method).

    One forward and one backward pass. For a linear model this step is the exact optimum of the
    loss over the ball (when clipping to [0, 1] does not bind).

    Defaults: no random start, step ``alpha = eps``; with ``random_start=True`` the step is
    ``alpha = 1.25 * eps`` from a uniform point of the ball, then projected back.
    """

    name = "fgsm"
    paper = "Goodfellow et al. 2015"

    def __init__(self, eps: float, norm: str = "linf", *, alpha: float | None = None, random_start: bool = False,
                 loss: str = "ce", targeted: bool = False, seed: int | None = None):
        super().__init__(eps, norm, loss=loss, targeted=targeted, seed=seed)
        self.random_start_on = bool(random_start)
        default = 1.25 * self.eps if self.random_start_on else self.eps
        self.alpha = float(alpha) if alpha is not None else default
        if not self.alpha > 0 and self.eps > 0:
            raise RcompError(f"--alpha must be positive, got {alpha}")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        x_adv = self.random_start(x) if self.random_start_on else x
        _, grad, logits = self.loss_and_grad(model, x_adv, y, target)
        return project(x, x_adv + self.alpha * ascent_direction(grad, self.norm), self.eps, self.norm)

    def _extra_params(self) -> dict[str, Any]:
        return {"steps": 1, "alpha": self.alpha, "random_start": self.random_start_on, "restarts": 1}
