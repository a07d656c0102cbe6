"""Optimizers and learning-rate schedules for :mod:`rcomp.train`.

The schedule is a pure function of the global step (:func:`lr_at`), so a resumed run only needs
the step count to continue exactly where it stopped. Defaults follow the study (Thorsteinsson et
al. 2024): SGD, lr 0.01, momentum 0.9, constant schedule.
"""

from __future__ import annotations

import math

from rcomp.errors import RcompError
from rcomp.train.catalog import OPTIMIZERS, SCHEDULES  # noqa: F401 - re-exported


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """``sgd`` (heavy-ball ``momentum``), ``adam`` or ``adamw`` (Loshchilov & Hutter 2019)."""
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise RcompError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def lr_at(step: int, total: int, base: float, schedule: str = "const", warmup: int = 0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``.

    * ``const``: ``base`` throughout;
    * ``step``: ``base`` times 0.1 after 50 % and again after 75 % of the steps;
    * ``cosine``: half-cosine from ``base`` to 0 (Loshchilov & Hutter 2017, no restarts);
    * ``onecycle``: linear up from ``base/25`` to ``base`` over the first 30 %, then linear down to
      0 (the piecewise-linear one-cycle of Smith 2018, as in Wong et al. 2020).

    ``warmup`` steps of linear warm-up from ``base/warmup`` multiply any of them (not onecycle, which
    has its own warm-up).
    """
    total = max(total, 1)
    t = min(step, total - 1) / total
    if schedule == "const":
        lr = base
    elif schedule == "step":
        lr = base * (0.1 ** ((t >= 0.5) + (t >= 0.75)))
    elif schedule == "cosine":
        lr = base * 0.5 * (1 + math.cos(math.pi * t))
    elif schedule == "onecycle":
        peak = 0.3
        lr = base * (0.04 + 0.96 * t / peak) if t < peak else base * (1 - t) / (1 - peak)
    else:
        raise RcompError(f"unknown --schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup > 0 and schedule != "onecycle" and step < warmup:
        lr *= (step + 1) / warmup
    return lr


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
