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
# The same check also measures the run's own training adversary (FGSM with or without random
# start, N-FGSM; the same seeded noise at every check) on the same images: "single", correct clean
# and under it. Two rules read the figures; either is a collapse.
#
# Rule 1 (fall: robustness gained, then lost): at a check, with ``best`` the highest PGD accuracy of
# the earlier checks,
#   pgd <= CO_RATIO * best  and  best - pgd >= max(CO_DROP, CO_Z * sqrt(2 best (1 - best) / n))
#       (fell far below its best, and by more than CO_Z standard deviations of the difference of two
#        binomial figures on the n check images: with n = 128 a fall from 0.2 to 0.1 is 2 of them,
#        and was seen on healthy N-FGSM runs, e.g. digits eps 0.2 at its 5th epoch: 0.203 -> 0.102)
#   and the epoch's training adversarial accuracy >= that of the best check's epoch - CO_SLACK
#       (the single-step adversary is still being beaten: it is the PGD figure alone that fell;
#        when the best check is the starting model, no such figure exists and the condition holds)
#   and the best check's clean accuracy was above chance (the CollapseMonitor's level, 0.19 for 10
#       classes): a model at chance has no robustness to lose (measured: FGSM training on `fake` at
#       eps 0.25 never learnt, and its PGD figure falling from 0.117 to 0.008 was noise, not a collapse).
# Rule 2 (gap: the textbook signature, which also catches a run that overfits from its first epochs
# and so never gains robustness to lose), at a check after a training epoch:
#   single - pgd >= max(CO_GAP, CO_Z * 0.5 / sqrt(n))  and  pgd <= CO_GAP_RATIO * single
#       (the training adversary leaves high accuracy and PGD takes at least 3/4 of it away)
#   and the check's clean accuracy is above chance.
#   Measured (benchmarks/bench_co_guard.py, docs/benchmarks.md; 1x8x8 digits and `fake`, 128 check images):
#   over every check with a gap of at least 0.3, runs that kept their robustness (FGSM with random start
#   or plain FGSM on `fake` at eps 0.15-0.16, PGD-5 near what N-FGSM reaches there) had PGD at 0.37-0.52 of
#   the single figure; runs that overfit (plain FGSM on `fake` at eps 0.175-0.2, the mlp at 0.2) at
#   0.01-0.12. Healthy PGD, FGSM-with-random-start and N-FGSM runs on digits at eps 0.1-0.2 kept gaps <= 0.24.
# On a collapse: training stops, the best check's weights (highest PGD accuracy) are restored, the
# collapse goes to stderr and the history (with the rule that fired), and the run fails (exit 1,
# nothing written) unless --allow-collapse, which writes the restored best weights instead.

CO_BATCH = 128
CO_STEPS = 5
CO_RATIO = 0.5
CO_DROP = 0.1
CO_SLACK = 0.05
CO_Z = 3.0
CO_GAP = 0.3
CO_GAP_RATIO = 0.25
CO_FIX = "use --adv n-fgsm (or --grad-align 0.2), a smaller --alpha, or write the best weights with --allow-collapse"


def fall_needed(best: float, n: int | None) -> float:
    """The fall from ``best`` that counts on ``n`` check images (rule 1; None: CO_DROP alone)."""
    if not n:
        return CO_DROP
    return max(CO_DROP, CO_Z * math.sqrt(2.0 * max(best * (1.0 - best), 0.0) / n))


def overfit_collapsed(pgd: float, best: float, train_adv: float | None, train_adv_at_best: float | None,
                      n: int | None = None) -> bool:
    """Rule 1 above (fall), on plain numbers (pure, so it can be tested exhaustively); ``n``: check images."""
    fell = pgd <= CO_RATIO * best and best - pgd >= fall_needed(best, n)
    if not fell:
        return False
    if train_adv is None or train_adv_at_best is None:
        return True
    return train_adv >= train_adv_at_best - CO_SLACK


def gap_needed(n: int | None) -> float:
    """The gap between the training adversary's and PGD's accuracy that counts on ``n`` check images (rule 2)."""
    return CO_GAP if not n else max(CO_GAP, CO_Z * 0.5 / math.sqrt(n))


def overfit_gap(single: float, pgd: float, n: int | None = None) -> bool:
    """Rule 2 above (gap), on plain numbers: the training adversary is beaten, PGD is not."""
    return single - pgd >= gap_needed(n) and pgd <= CO_GAP_RATIO * single


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
    #: the run's training adversary (a resolved AdvConfig): its accuracy on the batch at each check (gap rule)
    adv: Any = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    num_classes: int | None = None  # from the model's outputs at the first check
    best: dict[str, Any] | None = None
    best_state: dict[str, Any] | None = None
    collapse: dict[str, Any] | None = None

    def pgd_accuracy(self, module) -> tuple[float, float]:
        """(clean, PGD robust) accuracy of ``module`` on the check batch, in eval mode, mode restored."""
        from rcomp.attacks import make_attack

        attack = make_attack("pgd", self.eps, norm=self.norm, steps=self.steps, seed=self.seed)
        return self._accuracy(module, attack)

    def single_accuracy(self, module) -> float | None:
        """Accuracy of ``module`` on the check batch under the run's own training adversary (correct clean and
        under it; the same seeded noise at every check); None without ``adv``."""
        if self.adv is None:
            return None
        from rcomp.seeding import derive_seed
        from rcomp.train.adversarial import training_attack

        return self._accuracy(module, training_attack(self.adv, derive_seed(self.seed, 1)))[1]

    def _accuracy(self, module, attack) -> tuple[float, float]:
        import torch

        was = module.training
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
        """Measure after ``epoch`` (the first check: the starting weights); the collapse dict when this check is one."""
        clean, pgd = self.pgd_accuracy(module)
        single = self.single_accuracy(module)
        row = {"epoch": epoch, "clean": round(clean, 6), "pgd": round(pgd, 6), "train_adv": train_adv,
               "single": None if single is None else round(single, 6)}
        first = not self.checks
        self.checks.append(row)
        rule = None
        if self.best is not None and self.best.get("clean", 1.0) >= self.chance_level() \
                and overfit_collapsed(pgd, self.best["pgd"], train_adv, self.best["train_adv"], n=len(self.y)):
            rule = "fall"
        elif not first and single is not None and clean >= self.chance_level() \
                and overfit_gap(single, pgd, n=len(self.y)):
            rule = "gap"
        if rule is not None and self.best is not None:
            self.collapse = {"epoch": epoch, "rule": rule, "pgd": row["pgd"], "single": row["single"],
                             "train_adv": train_adv, "best_epoch": self.best["epoch"], "best_pgd": self.best["pgd"]}
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
        when = "the starting weights" if c.get("best_epoch") == 0 else f"the weights after epoch {c.get('best_epoch')}"
        head = f"catastrophic overfitting in epoch {c.get('epoch')}: "
        where = f"on the check batch ({len(self.y)} {self.source})"
        if c.get("rule") == "gap":
            return (f"{head}the training adversary ({self.adv_name()}) leaves accuracy {c.get('single', 0):.3f} "
                    f"{where} but PGD-{self.steps} only {c.get('pgd', 0):.3f}; "
                    f"training stopped and {when} (PGD {c.get('best_pgd', 0):.3f}) were restored")
        adv = f" while training adversarial accuracy stood at {c['train_adv']:.3f}" if c.get("train_adv") is not None \
            else ""
        return (f"{head}PGD-{self.steps} accuracy {where} fell to {c.get('pgd', 0):.3f} from its best "
                f"{c.get('best_pgd', 0):.3f}{adv}; training stopped and {when} were restored")

    def adv_name(self) -> str:
        a = self.adv
        if a is None:
            return "none"
        if a.mode == "fgsm":
            return "fgsm" + ("" if a.random_start else " without random start")
        return a.mode

    def passes_per_check(self) -> int:
        """Forward+backward passes of one check per image: PGD's steps and its final forward, the adversary's 2."""
        return self.steps + 1 + (2 if self.adv is not None else 0)

    def record(self, batch_size: int) -> dict[str, Any]:
        """What the history keeps: the check, each figure, the collapse, its cost in passes."""
        passes = len(self.checks) * self.passes_per_check() * len(self.y) / max(batch_size, 1)
        out = {"check": f"pgd-{self.steps} eps {self.eps:.6g} on {len(self.y)} {self.source} (seed {self.seed})",
               "pgd_acc": [c["pgd"] for c in self.checks], "best_epoch": self.best["epoch"] if self.best else None,
               "collapse": self.collapse, "guard_passes": round(passes, 2)}
        if self.adv is not None:
            out["single_acc"] = [c["single"] for c in self.checks]
            out["single_attack"] = self.adv_name()
        return out
