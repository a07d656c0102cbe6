"""Guards of a training run: a non-finite loss or weights stop it; a collapse to chance fails it.

A run that produces NaN or infinite numbers, or a model that predicts no better than chance,
must not end in a saved model with exit 0. Both raise :class:`~rcomp.errors.TrainingFailed`
(exit code 1) before anything is written.

Collapse. Adversarial objectives have trivial minimisers: a model whose output does not depend
on its input makes TRADES' KL term zero and every adversarial example harmless. A run from a
trained checkpoint can fall into it (the weights die and the loss sticks at ``log K``, the
cross-entropy of a uniform guess over ``K`` classes). An epoch counts as *at chance* when its
clean training accuracy is below ``chance + 0.1 * (1 - chance)`` (0.19 for 10 classes), and as
*stuck* when its loss is within 5 % of ``log K`` and moved less than 0.5 % since the previous
epoch. Each such epoch is warned about; the run fails at the end when its last epoch is at
chance although the model started above it (a run from scratch that has not learnt yet is
warned about, not failed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rcomp.errors import TrainingFailed

FIX = "lower --lr (or --beta for trades) or use --optimizer adam"


def check_finite_loss(losses, epoch: int, step: int) -> None:
    """Stop the run if a batch's loss is NaN or infinite."""
    import torch

    if not bool(torch.isfinite(losses.detach()).all()):
        raise TrainingFailed(f"training diverged in epoch {epoch}: the loss became non-finite at step {step}; "
                             f"nothing was written; {FIX}")


def check_finite_weights(module, epoch: int) -> None:
    """Stop the run if any parameter or buffer of ``module`` holds NaN or infinity."""
    import torch

    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            raise TrainingFailed(f"training diverged in epoch {epoch}: weight {name} became non-finite; "
                                 f"nothing was written; {FIX}")


@dataclass
class CollapseMonitor:
    """Watches each epoch's clean training accuracy and loss for a collapse (see the module docstring)."""

    num_classes: int
    start_acc: float | None = None
    losses: list[float] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)

    @property
    def chance(self) -> float:
        return 1.0 / max(self.num_classes, 1)

    @property
    def level(self) -> float:
        return self.chance + 0.1 * (1.0 - self.chance)

    def _stuck(self) -> bool:
        if len(self.losses) < 2 or self.num_classes < 2:
            return False
        prev, last = self.losses[-2], self.losses[-1]
        uniform = math.log(self.num_classes)
        return abs(last - uniform) <= 0.05 * uniform and abs(last - prev) <= 0.005 * max(abs(prev), 1e-12)

    def epoch(self, row: dict[str, Any]) -> str | None:
        """Record an epoch's row; a warning line if the epoch looks collapsed, else None."""
        self.losses.append(float(row["loss"]))
        self.accs.append(float(row["train_acc"]))
        acc, best = self.accs[-1], max([*self.accs, self.start_acc or 0.0])
        if acc < self.level and (best >= self.level or len(self.accs) >= 3):
            # falling back to chance, or a new model still at chance after 3 epochs (not in its first ones)
            what = "the model may be collapsing" if best >= self.level else "the model is not learning"
            return (f"warning: epoch {row['epoch']}: clean training accuracy {acc:.3f} is at chance "
                    f"({self.chance:.3f} for {self.num_classes} classes); {what}")
        if self._stuck():
            return (f"warning: epoch {row['epoch']}: the loss is stuck at {self.losses[-1]:.4f}, "
                    f"a uniform guess (log {self.num_classes} = {math.log(self.num_classes):.4f})")
        return None

    def verdict(self, row: dict[str, Any]) -> None:
        """Raise :class:`TrainingFailed` if the run ended collapsed (``row``: the last epoch)."""
        acc = float(row["train_acc"])
        if acc < self.level and self.start_acc is not None and self.start_acc >= self.level:
            raise TrainingFailed(
                f"training collapsed: clean training accuracy fell from {self.start_acc:.3f} to {acc:.3f} in epoch "
                f"{row['epoch']}, chance level ({self.chance:.3f}), with loss {row['loss']}; nothing was written; {FIX}, "
                "or allow it with --allow-collapse")
