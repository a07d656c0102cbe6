"""Guards of a training run: a non-finite loss or weights stop it; a collapse to chance fails it.

A run that produces NaN or infinite numbers, or whose loss explodes (divergence), or a model that predicts no better than chance,
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
#: an epoch whose mean loss exceeds this many times the starting loss (or log K) has diverged
DIVERGE_FACTOR = 100


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
    #: a loss the run started from, when known (the reference for divergence is at least log K)
    start_loss: float | None = None
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

    def diverged(self, row: dict[str, Any]) -> None:
        """Raise :class:`TrainingFailed` when an epoch's loss exploded: over :data:`DIVERGE_FACTOR` times
        the larger of the starting loss and ``log K`` (a uniform guess). No ``--allow-collapse`` keeps such
        a model: collapse is not divergence. (``--lr 10 --optimizer adam`` reaches losses of 1e19 while its
        accuracy can sit just above the collapse level, so the collapse check alone let it through.)"""
        loss = float(row["loss"])
        ref = max(self.start_loss or 0.0, math.log(max(self.num_classes, 2)))
        if not math.isfinite(loss) or loss > DIVERGE_FACTOR * ref:
            raise TrainingFailed(f"training diverged in epoch {row['epoch']}: the loss rose to {loss:.4g}, over "
                                 f"{DIVERGE_FACTOR}x the loss of a uniform guess or its start ({ref:.4g}); nothing was written; {FIX}")

    def epoch(self, row: dict[str, Any]) -> str | None:
        """Record an epoch's row; a warning line if the epoch looks collapsed, else None."""
        self.diverged(row)
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


# ----------------------------------------------------------------------------- catastrophic overfitting
#
# Single-step adversarial training (fgsm, n-fgsm) can overfit catastrophically (Wong et al., ICLR
# 2020; de Jorge et al., NeurIPS 2022): within a few steps the model becomes robust to its own
# single-step adversary while multi-step PGD accuracy falls to about 0. Its final model looks fine
# to anyone reading the training accuracies. The guard measures what the run is for.
#
# Check batch: a fixed, seeded batch of up to CO_BATCH images, from the validation split when
# --val-split is given, else from the training images (as Wong et al. detect it: catastrophic
# overfitting shows on training points as much as on held-out ones). Check: PGD-CO_STEPS (step
# 2.5 eps / steps, random start, the same seeded starts at every check) robust accuracy on that
# batch, correct clean and under PGD, before training and after every epoch.
#
# Rule (collapse): at a check, with ``best`` the highest PGD accuracy of the earlier checks,
#   pgd <= CO_RATIO * best  and  best - pgd >= CO_DROP      (fell far below its best)
#   and the epoch's training adversarial accuracy >= that of the best check's epoch - CO_SLACK
#       (the single-step adversary is still being beaten: it is the PGD figure alone that fell;
#        when the best check is the starting model, no such figure exists and the condition holds)
#   and the best check's clean accuracy was above chance (the CollapseMonitor's level, 0.19 for 10
#       classes): a model at chance has no robustness to lose (measured: FGSM training on `fake` at
#       eps 0.25 never learnt, and its PGD figure falling from 0.117 to 0.008 was noise, not a collapse).
# On a collapse: training stops, the best check's weights are restored, the collapse goes to
# stderr and the history, and the run fails (exit 1, nothing written) unless --allow-collapse,
# which writes the restored best weights instead.

CO_BATCH = 128
CO_STEPS = 5
CO_RATIO = 0.5
CO_DROP = 0.1
CO_SLACK = 0.05
CO_FIX = "use --adv n-fgsm (or --grad-align 0.2), a smaller --alpha, or write the best weights with --allow-collapse"


def overfit_collapsed(pgd: float, best: float, train_adv: float | None, train_adv_at_best: float | None) -> bool:
    """The collapse rule above, on plain numbers (pure, so it can be tested exhaustively)."""
    fell = pgd <= CO_RATIO * best and best - pgd >= CO_DROP
    if not fell:
        return False
    if train_adv is None or train_adv_at_best is None:
        return True
    return train_adv >= train_adv_at_best - CO_SLACK


@dataclass
class OverfitGuard:
    """Watches PGD accuracy on a fixed batch for catastrophic overfitting (see the comment above)."""

    x: Any
    y: Any
    eps: float
    norm: str
    seed: int
    source: str = "training images"
    steps: int = CO_STEPS
    checks: list[dict[str, Any]] = field(default_factory=list)
    num_classes: int | None = None  # from the model's outputs at the first check
    best: dict[str, Any] | None = None
    best_state: dict[str, Any] | None = None
    collapse: dict[str, Any] | None = None

    def pgd_accuracy(self, module) -> tuple[float, float]:
        """(clean, PGD robust) accuracy of ``module`` on the check batch, in eval mode, mode restored."""
        import torch

        from rcomp.attacks import make_attack

        was = module.training
        attack = make_attack("pgd", self.eps, norm=self.norm, steps=self.steps, seed=self.seed)
        module.eval()
        try:
            with torch.no_grad():
                logits = module(self.x)
                self.num_classes = int(logits.shape[1])
                clean = logits.argmax(1) == self.y
            x_adv = attack(module, self.x, self.y)
            with torch.no_grad():
                adv = module(x_adv).argmax(1) == self.y
        finally:
            module.train(was)  # train(True) also re-arms fake-quant observers
        n = max(len(self.y), 1)
        return float(clean.sum()) / n, float((clean & adv).sum()) / n

    def check(self, module, epoch: int, train_adv: float | None) -> dict[str, Any] | None:
        """Measure after ``epoch`` (0: the starting weights); the collapse dict when this check is one."""
        clean, pgd = self.pgd_accuracy(module)
        row = {"epoch": epoch, "clean": round(clean, 6), "pgd": round(pgd, 6), "train_adv": train_adv}
        self.checks.append(row)
        if self.best is not None and self.best.get("clean", 1.0) >= self.chance_level() \
                and overfit_collapsed(pgd, self.best["pgd"], train_adv, self.best["train_adv"]):
            self.collapse = {"epoch": epoch, "pgd": row["pgd"], "train_adv": train_adv,
                             "best_epoch": self.best["epoch"], "best_pgd": self.best["pgd"]}
            return self.collapse
        if self.best is None or pgd > self.best["pgd"]:
            self.best = row
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return None

    def chance_level(self) -> float:
        """Clean accuracy at or below which a model counts as at chance (as :class:`CollapseMonitor`'s)."""
        k = self.num_classes or (int(self.y.max()) + 1 if len(self.y) else 2)
        return CollapseMonitor(max(k, 2)).level

    def restore_best(self, module) -> None:
        if self.best_state is not None:
            module.load_state_dict(self.best_state)

    def message(self) -> str:
        c = self.collapse or {}
        adv = f" while training adversarial accuracy stood at {c['train_adv']:.3f}" if c.get("train_adv") is not None \
            else ""
        when = "the starting weights" if c.get("best_epoch") == 0 else f"the weights after epoch {c.get('best_epoch')}"
        return (f"catastrophic overfitting in epoch {c.get('epoch')}: PGD-{self.steps} accuracy on the check batch "
                f"({len(self.y)} {self.source}) fell to {c.get('pgd', 0):.3f} from its best {c.get('best_pgd', 0):.3f}"
                f"{adv}; training stopped and {when} were restored")

    def record(self, batch_size: int) -> dict[str, Any]:
        """What the history keeps: the check, each figure, the collapse, its cost in passes."""
        passes = len(self.checks) * (self.steps + 1) * len(self.y) / max(batch_size, 1)
        return {"check": f"pgd-{self.steps} eps {self.eps:.6g} on {len(self.y)} {self.source} (seed {self.seed})",
                "pgd_acc": [c["pgd"] for c in self.checks], "best_epoch": self.best["epoch"] if self.best else None,
                "collapse": self.collapse, "guard_passes": round(passes, 2)}
