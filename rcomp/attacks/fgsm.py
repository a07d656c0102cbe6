"""FGSM: one gradient step to the edge of the eps ball.

Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
With ``random_start=True`` it is the "FGSM with random initialisation" of Wong, Rice and Kolter,
"Fast is better than free: revisiting adversarial training", ICLR 2020 (step 1.25 * eps).

:class:`NFGSM` is N-FGSM, de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez and Dokania, "Make Some Noise:
Reliable and Efficient Single-Step Adversarial Training", NeurIPS 2022: a *training* adversary
whose examples leave the eps ball on purpose (not registered for ``rcomp attack``).
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


class NFGSM(FGSM):
    """N-FGSM (de Jorge et al., NeurIPS 2022), L-inf only: ``x + eta`` with ``eta`` uniform in
    ``[-k eps, k eps]`` (``noise`` = k, default 2), clamped to [0, 1]; one signed-gradient step of
    ``alpha`` (default eps) from there; clamped to [0, 1] and NOT projected back onto the eps ball
    (the paper's point: no clipping, so the perturbation can reach ``k eps + alpha``, 3 eps by
    default). One forward and one backward pass, like FGSM.

    This is a training adversary: :meth:`radius` is ``k eps + alpha``, so its examples break the
    eps-ball guarantee of evaluation attacks; it is not in :data:`rcomp.attacks.ATTACKS`.
    """

    name = "n-fgsm"
    paper = "de Jorge et al. 2022"

    def __init__(self, eps: float, norm: str = "linf", *, alpha: float | None = None, noise: float = 2.0,
                 seed: int | None = None):
        if norm != "linf":
            raise RcompError("n-fgsm is defined for --norm linf only; use --adv fgsm or pgd with --norm l2")
        super().__init__(eps, norm, alpha=_nfgsm_alpha(alpha, eps), random_start=False, seed=seed)
        if not noise >= 0:
            raise RcompError(f"n-fgsm's noise multiplier must be >= 0, got {noise}")
        self.noise = float(noise)

    def radius(self) -> float:
        return self.noise * self.eps + self.alpha

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        g = self.generator(x.device, stream=1)
        eta = (torch.rand(x.shape, generator=g, device=g.device).to(x.device) * 2 - 1) * (self.noise * self.eps)
        x_noisy = (x + eta).clamp(0.0, 1.0)
        _, grad, _ = self.loss_and_grad(model, x_noisy, y, target)
        return (x_noisy + self.alpha * ascent_direction(grad, "linf")).clamp(0.0, 1.0)

    def _extra_params(self) -> dict[str, Any]:
        return {"steps": 1, "alpha": self.alpha, "noise": self.noise, "projection": "none", "restarts": 1}


def _nfgsm_alpha(alpha: float | None, eps: float) -> float:
    """N-FGSM's step: ``alpha`` if given, else eps (the paper's default)."""
    return float(alpha) if alpha is not None else float(eps)
