"""APGD: step-size-free PGD with momentum, the core of AutoAttack.

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (Algorithm 1). Follows the reference implementation
(fra31/auto-attack, ``autopgd_base.py``): step size ``2 * eps``, momentum 0.75, checkpoints every
``p_j`` of the budget (first at 22 %, then shrinking by 3 % to at least 6 %), and at each
checkpoint the step size is halved, and the iterate reset to the best point so far, for the
examples whose loss rose in fewer than ``rho = 75 %`` of the steps since the last checkpoint or
whose best loss did not improve with an unchanged step size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rcomp.attacks.base import Attack, _bcast, ascent_direction, flat_norm, project
from rcomp.errors import RcompError


class APGD(Attack):
    """Auto-PGD with the cross-entropy (``loss="ce"``, APGD-CE) or the difference-of-logits-ratio
    loss (``loss="dlr"``, APGD-DLR; targeted: APGD-T's targeted DLR).

    Defaults: ``steps=100`` (the AutoAttack budget), ``restarts=1``, ``rho=0.75``, random start
    on the sphere of radius eps (as the reference). Costs ``steps + 1`` forward+backward passes
    per restart. Returns, per example, the first iterate that fooled the model, else the iterate
    with the highest loss. Restarts after the first attack only the examples not yet fooled.
    """

    name = "apgd"
    paper = "Croce and Hein 2020"

    def __init__(self, eps: float, norm: str = "linf", *, steps: int | None = None, restarts: int = 1,
                 loss: str = "ce", rho: float = 0.75, random_start: bool = True, targeted: bool = False,
                 seed: int | None = None, surrogate_restarts: int | None = None):
        super().__init__(eps, norm, loss=loss, targeted=targeted, seed=seed)
        self.steps, restarts = self.iterations(steps, 100, restarts)
        if not 0 < rho <= 1:
            raise RcompError(f"rho must be in (0, 1], got {rho}")
        self.restarts = int(restarts)
        #: restarts used instead of ``restarts`` when the model's gradients are a surrogate (None: the same)
        self.surrogate_restarts = None if surrogate_restarts is None else self.iterations(None, 1, surrogate_restarts)[1]
        self.rho = float(rho)
        self.random_start_on = bool(random_start)

    def _extra_params(self) -> dict[str, Any]:
        extra = {} if self.surrogate_restarts is None else {"restarts_on_surrogate_gradients": self.surrogate_restarts}
        return {"steps": self.steps, "restarts": self.restarts, **extra, "rho": self.rho,
                "random_start": self.random_start_on, "alpha": "adaptive (2 * eps, halved at checkpoints)"}

    def runs(self) -> int:
        """Restarts for the model now attacked: ``surrogate_restarts`` when its gradients are not exact."""
        if self.surrogate_restarts is not None and self.gradient_source != "exact":
            return self.surrogate_restarts
        return self.restarts

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        best, done = self._run(model, x, y, target, 0)
        for r in range(1, self.runs()):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adv, ok = self._run(model, x[idx], y[idx], None if target is None else target[idx], r)
            best[idx] = adv
            done[idx] = ok
        return best

    def _start(self, x: torch.Tensor, restart: int) -> torch.Tensor:
        if not self.random_start_on:
            return x.clone()
        g = self.generator(x.device, stream=restart + 1)
        if self.norm == "linf":
            t = torch.rand(x.shape, generator=g, device=x.device) * 2 - 1
        else:
            t = torch.randn(x.shape, generator=g, device=x.device)
        t = t / _bcast(flat_norm(t, self.norm) + 1e-12, t)
        return (x + self.eps * t).clamp(0.0, 1.0)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
             restart: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One run of APGD on ``x``: per point, the first iterate that fooled the model (and True),
        else the highest-loss iterate (and False). A point leaves the batch as soon as it is fooled,
        so it costs no further passes; every step is per point, so this changes no other point's
        trajectory (the result is the same as attacking each point alone)."""
        n_iter = self.steps
        k = max(int(0.22 * n_iter), 1)  # iterations until the first checkpoint
        k_min = max(int(0.06 * n_iter), 1)
        k_decr = max(int(0.03 * n_iter), 1)

        def b(mask: torch.Tensor) -> torch.Tensor:
            return mask.view(-1, *([1] * (x.dim() - 1)))

        x_adv = self._start(x, restart)
        loss, grad, logits = self.loss_and_grad(model, x_adv, y, target)
        found = self.succeeded(logits, y, target)
        out = x_adv.clone()  # per point: its fooling iterate, or (for the survivors, at the end) its best one
        out_found = found.clone()
        # the state of the points still being attacked, compacted; ``live`` holds their positions in x
        live = (~found).nonzero().squeeze(1)
        xs, ys, ts = x[live], y[live], None if target is None else target[live]
        x_adv, loss, grad = x_adv[live], loss[live], grad[live]
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        history = [loss]  # history[i] = loss of iterate i of the current checkpoint window
        step = torch.full((live.numel(),), 2.0 * self.eps, device=x.device)
        x_old = x_adv
        since_check = 0
        loss_best_last = loss_best.clone()
        reduced_last = torch.ones(live.numel(), dtype=torch.bool, device=x.device)
        for i in range(n_iter):
            if live.numel() == 0:  # every point fooled
                break
            with torch.no_grad():
                momentum = x_adv - x_old
                x_old = x_adv
                a = 0.75 if i > 0 else 1.0
                z = project(xs, x_adv + _bcast(step, xs) * ascent_direction(grad, self.norm), self.eps, self.norm)
                x_adv = project(xs, x_adv + (z - x_adv) * a + momentum * (1 - a), self.eps, self.norm)
            loss, grad, logits = self.loss_and_grad(model, x_adv, ys, ts)
            new = self.succeeded(logits, ys, ts)
            any_new = bool(new.any())
            if any_new:  # record the fooling iterates now (a checkpoint below may move x_adv)
                out[live[new]] = x_adv[new]
                out_found[live[new]] = True
            history.append(loss)
            better = loss > loss_best
            x_best = torch.where(b(better), x_adv, x_best)
            grad_best = torch.where(b(better), grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)
            since_check += 1
            if since_check == k:
                h = torch.stack(history[-(k + 1):])
                rises = (h[1:] > h[:-1]).float().sum(0)
                oscillating = rises <= k * self.rho
                stalled = ~reduced_last & (loss_best_last >= loss_best)
                reduce = oscillating | stalled
                reduced_last = reduce
                loss_best_last = loss_best.clone()
                step = torch.where(reduce, step / 2, step)
                x_adv = torch.where(b(reduce), x_best, x_adv)
                grad = torch.where(b(reduce), grad_best, grad)
                k = max(k - k_decr, k_min)
                since_check = 0
                history = history[-1:]
            if any_new:  # drop the fooled points from the batch
                keep = ~new
                live, xs, ys = live[keep], xs[keep], ys[keep]
                ts = None if ts is None else ts[keep]
                x_adv, x_old, grad, loss = x_adv[keep], x_old[keep], grad[keep], loss[keep]
                x_best, grad_best, loss_best = x_best[keep], grad_best[keep], loss_best[keep]
                step, loss_best_last, reduced_last = step[keep], loss_best_last[keep], reduced_last[keep]
                history = [t[keep] for t in history]
        out[live] = x_best
        return out, out_found
