"""The training choices, listed once (no torch): adversarial objectives, optimizers, schedules."""

from __future__ import annotations

#: none, FGSM with a random start (Wong et al. 2020), N-FGSM (de Jorge et al. 2022), PGD (Madry et al. 2018),
#: TRADES (Zhang et al. 2019)
ADV_MODES = ("none", "fgsm", "n-fgsm", "pgd", "trades")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("const", "step", "cosine", "onecycle")
#: the objectives trained with cross-entropy on their adversarial examples alone (trades mixes clean and KL)
ATTACK_MODES = ("fgsm", "n-fgsm", "pgd")
#: single-step modes: catastrophic overfitting is their known failure (see rcomp.train.guards)
SINGLE_STEP = ("fgsm", "n-fgsm")
#: each optimizer's default peak learning rate
DEFAULT_LR = {"sgd": 0.01, "adam": 3e-3, "adamw": 3e-3}
