"""Training cost counted in forward+backward passes, read from a checkpoint's history.

One pass is one forward and one backward pass over the batch. A training step costs
(:func:`passes_per_step`):

* ``none``: 1;
* ``fgsm`` and ``n-fgsm``: 2 (the attack's gradient, then the training pass);
* ``pgd`` with S steps: 1 + S (PGD-7: 8);
* ``trades`` with S steps: 2 + S (S attack steps; the training pass runs clean and adversarial
  images together, a batch twice the size: 2). earlier versions counted 1 + S;
* ``--grad-align``: 4 more (1 for the input gradient at x; 1 for the one at x + eta built with
  ``create_graph``; about 2 for backpropagating through that gradient, double backpropagation
  costing about two forward+backward passes). So fgsm/n-fgsm with GradAlign: 6.

Not counted: forward passes without a backward (the clean logits that give the training accuracy,
TRADES' clean prediction), validation and the catastrophic-overfitting guard's PGD checks (recorded
separately in the history as ``guard_passes``). The budget of a fine-tuning run can then be stated as
a fraction of another run's cost (``finetune --budget-of CKPT --budget-fraction F``), and the demo
report states every budget that way. Pure Python.
"""

from __future__ import annotations

import math

from rcomp.errors import RcompError
from rcomp.train.catalog import SINGLE_STEP

#: digits' training images: the size assumed when an old history entry records neither steps nor n
DEFAULT_TRAIN_SIZE = 1437


#: a count read from a history (steps, epochs, images, batch size) is a whole number up to this
MAX_COUNT = 10**12
#: the largest budget --steps-budget accepts (rcomp.stages.finetune declares the same)
MAX_BUDGET_STEPS = 10**9


def _count(value, what: str, default=None):
    """A whole, non-negative count from a file's history; anything else (text, inf, 1e308) is refused."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            isinstance(value, int) or (math.isfinite(value) and value.is_integer())) or not 0 <= value <= MAX_COUNT:
        raise RcompError(f"the training history records {what} as {str(value)[:40]!r}, not a whole number up to "
                         f"{MAX_COUNT}; the reference checkpoint is damaged or edited")
    return int(value)


#: extra passes a step of GradAlign costs (see the module docstring)
GRAD_ALIGN_PASSES = 4


def passes_per_step(adv: str | None, attack_steps: int | None, grad_align: float | None = 0.0) -> int:
    """Forward+backward passes of one training step (see the module docstring)."""
    adv = adv or "none"
    if not isinstance(adv, str):
        raise RcompError(f"the training history records adv as {str(adv)[:40]!r}, not a name; the reference "
                         "checkpoint is damaged or edited")
    if adv == "none":
        base = 1
    elif adv in SINGLE_STEP:
        base = 2
    elif adv == "pgd":
        base = 1 + (_count(attack_steps, "the attack steps") or 10)
    elif adv == "trades":
        base = 2 + (_count(attack_steps, "the attack steps") or 10)
    else:
        raise RcompError(f"no pass count for --adv {adv!r}; the checkpoint was written by a newer rcomp")
    return base + (GRAD_ALIGN_PASSES if grad_align else 0)


def training_cost(entry: dict, train_size: int = DEFAULT_TRAIN_SIZE) -> float | None:
    """Forward+backward passes of one ``finetune`` history entry: steps x (1 + attack steps).

    Steps are those recorded as taken, else the budget, else ``epochs x ceil(train images / batch)``."""
    params = entry.get("params") or {}
    results = entry.get("results") or entry.get("metrics") or {}
    if not isinstance(params, dict) or not isinstance(results, dict):
        raise RcompError("a training history entry has params or metrics that are not objects; the reference "
                         "checkpoint is damaged or edited")
    steps = _count(results.get("steps", results.get("steps_taken", params.get("steps_taken"))), "the steps taken")
    if steps is None:
        epochs = _count(params.get("epochs"), "the epochs")
        batch = _count(params.get("batch_size"), "the batch size") or 128
        n = _count(params.get("n"), "the training images") or train_size
        full = epochs * math.ceil(n / batch) if epochs else None
        budget = _count(params.get("steps_budget"), "the step budget")
        steps = min(x for x in (full, budget) if x is not None) if (full or budget) else None
    if steps is None:
        return None
    return float(steps) * passes_per_step(params.get("adv"), params.get("steps"), params.get("grad_align"))


def history_cost(history: list[dict]) -> float | None:
    """All the training in a history (a compressed model's includes the model it was made from)."""
    costs = [training_cost(h) for h in history if h.get("command") == "finetune"]
    return None if not costs or None in costs else sum(costs)


def steps_for_fraction(fraction: float, reference_history: list[dict], adv: str, attack_steps: int | None,
                       reference: str = "the reference", grad_align: float | None = 0.0) -> int:
    """Optimizer steps that cost ``fraction`` of the reference's training, at this run's cost per step
    (rounded to the nearest step, at least 1)."""
    ref = history_cost(reference_history)
    if not ref:
        raise RcompError(f"{reference} records no training to take a fraction of; give --steps-budget instead")
    steps = fraction * ref / passes_per_step(adv, attack_steps, grad_align)
    if not math.isfinite(steps) or steps > MAX_BUDGET_STEPS:
        raise RcompError(f"{reference}'s recorded training makes a budget of {steps:.3g} steps, over the "
                         f"{MAX_BUDGET_STEPS:,} --steps-budget allows; its history is damaged or edited, or give "
                         "--steps-budget instead")
    return max(1, round(steps))
