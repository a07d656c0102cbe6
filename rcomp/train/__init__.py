"""Standard and adversarial training (``rcomp finetune``): the Python API.

>>> from rcomp.train import TrainConfig, AdvConfig, finetune
>>> model, metrics = finetune(model, train_ds, TrainConfig(epochs=3, adv=AdvConfig("pgd", eps=0.1)))

Modules: :mod:`.loop` (the loop and :class:`TrainConfig`), :mod:`.adversarial` (none / fgsm /
pgd / trades objectives), :mod:`.optim` (optimizers, schedules), :mod:`.augment`,
:mod:`.distributed` (torchrun + DDP), :mod:`.state` (pickle-free, digest-checked resumable state) and
:mod:`.guards` (non-finite and collapsed runs fail with exit code 1). The adversaries are
:mod:`rcomp.attacks` objects; accuracies go through :mod:`rcomp.evaluation`.
"""

from rcomp.train.adversarial import MODES, AdvConfig
from rcomp.train.loop import TrainConfig, evaluate_split, finetune

__all__ = ["MODES", "AdvConfig", "TrainConfig", "evaluate_split", "finetune"]
