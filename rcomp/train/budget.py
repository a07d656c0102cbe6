"""Training cost counted in forward+backward passes, read from a checkpoint's history.

A training step costs ``1 + attack steps`` passes (standard 1, FGSM 2, PGD-7 8): the budget of a
fine-tuning run can then be stated as a fraction of another run's cost (``finetune --budget-of CKPT
--budget-fraction F``), and the demo report states every budget that way. Pure Python.
"""

from __future__ import annotations

import math

from rcomp.errors import RcompError

#: digits' training images: the size assumed when an old history entry records neither steps nor n
DEFAULT_TRAIN_SIZE = 1437


def passes_per_step(adv: str | None, attack_steps: int | None) -> int:
    adv = adv or "none"
    return 1 if adv == "none" else 1 + (1 if adv == "fgsm" else int(attack_steps or 10))


def training_cost(entry: dict, train_size: int = DEFAULT_TRAIN_SIZE) -> float | None:
    """Forward+backward passes of one ``finetune`` history entry: steps x (1 + attack steps).

    Steps are those recorded as taken, else the budget, else ``epochs x ceil(train images / batch)``."""
    params = entry.get("params") or {}
    results = entry.get("results") or entry.get("metrics") or {}
    steps = results.get("steps", results.get("steps_taken", params.get("steps_taken")))
    if steps is None:
        epochs, batch = params.get("epochs"), params.get("batch_size") or 128
        n = params.get("n") or train_size
        full = epochs * math.ceil(n / batch) if epochs else None
        budget = params.get("steps_budget")
        steps = min(x for x in (full, budget) if x is not None) if (full or budget) else None
    if steps is None:
        return None
    return float(steps) * passes_per_step(params.get("adv"), params.get("steps"))


def history_cost(history: list[dict]) -> float | None:
    """All the training in a history (a compressed model's includes the model it was made from)."""
    costs = [training_cost(h) for h in history if h.get("command") == "finetune"]
    return None if not costs or None in costs else sum(costs)


def steps_for_fraction(fraction: float, reference_history: list[dict], adv: str, attack_steps: int | None,
                       reference: str = "the reference") -> int:
    """Optimizer steps that cost ``fraction`` of the reference's training, at this run's cost per step."""
    ref = history_cost(reference_history)
    if not ref:
        raise RcompError(f"{reference} records no training to take a fraction of; give --steps-budget instead")
    return max(1, round(fraction * ref / passes_per_step(adv, attack_steps)))
