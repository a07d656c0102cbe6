"""PGD: projected gradient ascent on the loss inside the eps ball, from a random start.

Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rcomp.attacks.base import Attack, ascent_direction, project
from rcomp.errors import RcompError


class PGD(Attack):
    """``x_{k+1} = Proj(x_k + alpha * dir(grad))`` for ``steps`` steps, ``restarts`` times.

    ``dir`` is sign(grad) for linf and grad / ||grad||_2 for l2; ``Proj`` projects onto the eps
    ball and clips to [0, 1].

    Defaults: ``steps=10``, ``alpha = 2.5 * eps / steps`` (Madry et al.), random start on
    (uniform in the linf ball; Gaussian direction with radius ``eps * U`` for l2), ``restarts=1``,
    cross-entropy loss.

    Per example, the first iterate that fools the model is kept (each iterate's logits come for
    free from the forward pass of its gradient); otherwise the last iterate is returned. With
    ``keep_last=True`` the last iterate is returned always: the training adversary of Madry et al.,
    which keeps climbing the loss after the label flips (right for training, weaker for evaluation). The cost
    is exactly ``steps`` forward+backward passes per restart. Restarts after the first only attack
    the examples not yet fooled, and restart ``r`` draws the same start whatever the number of
    restarts, so more restarts (or more steps at the same ``alpha``) never find fewer examples.
    """

    name = "pgd"
    paper = "Madry et al. 2018"
    default_steps = 10
    default_loss = "ce"

    def __init__(self, eps: float, norm: str = "linf", *, steps: int | None = None, alpha: float | None = None,
                 random_start: bool = True, restarts: int = 1, loss: str | None = None, targeted: bool = False,
                 seed: int | None = None, keep_last: bool = False):
        super().__init__(eps, norm, loss=loss or self.default_loss, targeted=targeted, seed=seed)
        self.steps, self.restarts = self.iterations(steps, self.default_steps, restarts)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        if alpha is not None and not self.alpha > 0:
            raise RcompError(f"--alpha must be positive, got {alpha}")
        self.random_start_on = bool(random_start)
        self.keep_last = bool(keep_last)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        best, done = self._run(model, x, y, target, 0)
        for r in range(1, self.restarts):
            with torch.no_grad():
                done = self.succeeded(model(best), y, target)
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adv, _ = self._run(model, x[idx], y[idx], None if target is None else target[idx], r)
            best[idx] = adv
        return best

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
             restart: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = self.random_start(x, restart) if self.random_start_on else x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        x_found = x_adv
        for _ in range(self.steps):
            _, grad, logits = self.loss_and_grad(model, x_adv, y, target)
            new = self.succeeded(logits, y, target) & ~found
            x_found = torch.where(new.view(-1, *([1] * (x.dim() - 1))), x_adv, x_found)
            found = found | new
            with torch.no_grad():
                x_adv = project(x, x_adv + self.alpha * ascent_direction(grad, self.norm), self.eps, self.norm)
        if self.keep_last:
            return x_adv, found
        out = torch.where(found.view(-1, *([1] * (x.dim() - 1))), x_found, x_adv)
        return out, found

    def _extra_params(self) -> dict[str, Any]:
        extra = {"steps": self.steps, "alpha": self.alpha, "random_start": self.random_start_on,
                 "restarts": self.restarts}
        return {**extra, "keep_last": True} if self.keep_last else extra
