"""Standard and adversarial training (``rcomp finetune``): the Python API.

>>> from rcomp.train import TrainConfig, AdvConfig, finetune
>>> model, metrics = finetune(model, train_ds, TrainConfig(epochs=3, adv=AdvConfig("pgd", eps=0.1)))

Modules: :mod:`.loop` (the loop and :class:`TrainConfig`), :mod:`.adversarial` (none / fgsm /
pgd / trades objectives), :mod:`.optim` (optimizers, schedules), :mod:`.augment`,
:mod:`.distributed` (torchrun + DDP), :mod:`.state` (pickle-free, digest-checked resumable state) and
:mod:`.guards` (non-finite and collapsed runs fail with exit code 1). The adversaries are
:mod:`rcomp.attacks` objects; accuracies go through :mod:`rcomp.evaluation`.
"""

from typing import Any

__all__ = ["MODES", "AdvConfig", "TrainConfig", "evaluate_split", "finetune"]

_LAZY = {"MODES": "rcomp.train.adversarial", "AdvConfig": "rcomp.train.adversarial", "TrainConfig": "rcomp.train.loop",
         "evaluate_split": "rcomp.train.loop", "finetune": "rcomp.train.loop"}


def __getattr__(name: str) -> Any:
    """The API loads torch on first use only (``rcomp.train.catalog`` is torch-free)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rcomp.train' has no attribute {name!r}")
