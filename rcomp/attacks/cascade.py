"""One batch of a cascade: which points are still robust, which attack fooled each first, and
the example kept per point. The evaluation loop (:mod:`rcomp.evaluation.robustness`) and the
``auto`` attack's own cascade (:func:`rcomp.attacks.auto.cascade_attack`) share it, so both keep
the same example for a point: the first that fooled it, else the last one made for it.
"""

from __future__ import annotations

from typing import Any

import torch


def uses_gradients(attack: Any) -> bool:
    """False for score-based or transfer attacks (attribute ``uses_gradients = False``)."""
    return bool(getattr(attack, "uses_gradients", True))


class BatchBook:
    """Which points of one batch are still robust, which attack fooled each first, and who fooled
    whom, stage after stage; with ``x``, also the example kept per point (the first that fooled it,
    else the last one made for it, else the clean image)."""

    def __init__(self, ok: torch.Tensor, cascade: bool, x: torch.Tensor | None = None, stages: int = 0):
        self.ok = ok
        self.cascade = cascade
        self.still = ok.clone()
        self.grad_fooled = torch.zeros_like(ok)
        self.grad_covered = ok.clone()  # attacked by every gradient attack so far
        self.free_fooled = torch.zeros_like(ok)
        self.first = torch.full(ok.shape, -1, dtype=torch.long, device=ok.device)
        self.norm = torch.zeros(ok.shape, dtype=torch.float32, device=ok.device)
        self.kept = x.detach().clone() if x is not None else None
        #: per point and attack: ran on it, left it correct, the size of its perturbation
        self.attacked = torch.zeros((len(ok), stages), dtype=torch.bool, device=ok.device)
        self.robust = torch.zeros((len(ok), stages), dtype=torch.bool, device=ok.device)
        self.attack_norm = torch.zeros((len(ok), stages), dtype=torch.float32, device=ok.device)

    def pool(self) -> torch.Tensor:
        """Indices the next attack runs on."""
        return (self.still if self.cascade else self.ok).nonzero().squeeze(1)

    def record(self, attack: Any, stage: int, idx: torch.Tensor, robust_sub: torch.Tensor,
               x_adv: torch.Tensor | None = None, norms: torch.Tensor | None = None) -> None:
        """Attack number ``stage`` ran on points ``idx``, made ``x_adv`` (perturbation sizes ``norms``)
        and left ``robust_sub`` of them correct."""
        fooled = torch.zeros_like(self.ok)
        fooled[idx] = ~robust_sub
        open_ = self.first[idx] < 0  # not fooled by an earlier attack: this example is the one kept
        rows = idx[open_]
        if norms is not None:
            self.norm[rows] = norms[open_].float()
        if self.kept is not None and x_adv is not None:
            self.kept[rows] = x_adv[open_].to(self.kept.dtype)
        self.first[rows[~robust_sub[open_]]] = stage
        if stage < self.attacked.shape[1]:
            self.attacked[idx, stage] = True
            self.robust[idx, stage] = robust_sub
            if norms is not None:
                self.attack_norm[idx, stage] = norms.float()
        self.still &= ~fooled
        if uses_gradients(attack):
            attacked = torch.zeros_like(self.ok)
            attacked[idx] = True
            self.grad_covered &= attacked
            self.grad_fooled |= fooled
        else:
            self.free_fooled |= fooled

    def masked(self) -> int:
        """Points a gradient-free attack fooled that every gradient attack was run on and missed."""
        return int((self.free_fooled & ~self.grad_fooled & self.grad_covered).sum())
