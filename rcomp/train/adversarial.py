"""Per-batch training objectives: standard, fast FGSM, PGD and TRADES adversarial training.

* ``none``: cross-entropy on clean images.
* ``fgsm``: fast adversarial training (Wong, Rice & Kolter, ICLR 2020): one signed-gradient step
  of size ``alpha`` (default 1.25 eps) from a uniform random start in the eps-ball.
* ``n-fgsm``: N-FGSM (de Jorge et al., NeurIPS 2022): noise uniform in ``[-k eps, k eps]`` (k = 2),
  one signed step of ``alpha`` (default eps), clamped to [0, 1] and NOT projected back onto the
  eps ball (:class:`rcomp.attacks.fgsm.NFGSM`); 2 passes a step like fgsm.
* ``pgd``: PGD adversarial training (Madry et al., ICLR 2018): ``steps`` steps (default 10) of size
  ``alpha`` (default 2.5 eps / steps) from a random start; cross-entropy on the result.
* ``trades``: TRADES (Zhang et al., ICML 2019): CE(clean) + beta * KL(p(clean) || p(adv)), the
  adversarial image maximising the KL term from a small Gaussian start (0.001); beta defaults
  to 1 (see :func:`trades_beta`).

GradAlign (Andriushchenko & Flammarion, NeurIPS 2020), ``grad_align = lambda > 0`` with fgsm or
n-fgsm: adds ``lambda * (1 - cos(grad_x CE(x), grad_x CE(x + eta)))`` per example, ``eta`` uniform
in the eps ball, the second gradient built with ``create_graph`` (double backpropagation; see
:mod:`rcomp.train.budget` for its cost in passes).

Every adversarial image lies within eps of the clean one in pixel space and in [0, 1], except
N-FGSM's, which by design reach ``k eps + alpha`` (still in [0, 1]). All the adversaries are :mod:`rcomp.attacks` objects (:func:`training_attack`): the same
projection, steps and random start as ``rcomp attack``; training's PGD keeps the *last* iterate
as in Madry et al. (``rcomp attack``'s keeps the first point that fools the model, right for
evaluation but a weaker training adversary), and TRADES' inner maximisation is PGD on the KL
loss (:class:`rcomp.attacks.trades.TradesKL`). Attacks differentiate ``model.gradient_model()``
when the model has one, run it in eval mode and compute input gradients only (no parameter
``.grad``). Losses are returned *per example* so that distributed training can weight its shards
exactly (see :mod:`.distributed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcomp.attacks.base import NORMS, kl_loss
from rcomp.errors import RcompError
from rcomp.train.catalog import ADV_MODES as MODES
from rcomp.train.catalog import ATTACK_MODES, SINGLE_STEP  # noqa: F401 - SINGLE_STEP re-exported


@dataclass
class AdvConfig:
    mode: str = "none"
    eps: float = 8 / 255
    alpha: float | None = None
    steps: int | None = None
    norm: str = "linf"
    beta: float = 1.0                # trades: weight of the KL term (see trades_beta for why not 6)
    beta_warmup: int = 0             # trades: optimizer steps over which beta rises from 0 (0: none)
    random_start: bool = True        # fgsm: start from a uniform point of the ball (Wong et al.); False: plain FGSM
    noise: float = 2.0               # n-fgsm: noise uniform in [-noise*eps, noise*eps] (de Jorge et al.: k = 2)
    grad_align: float = 0.0          # GradAlign weight lambda (fgsm, n-fgsm); 0: off

    def resolved(self) -> AdvConfig:
        """Fill in the defaults: fgsm alpha 1.25 eps (eps without random start); n-fgsm alpha eps;
        pgd/trades 10 steps of 2.5 eps / steps."""
        if self.mode not in MODES:
            raise RcompError(f"unknown --adv {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.norm not in NORMS:
            raise RcompError(f"unknown --norm {self.norm!r}; choose linf or l2")
        single = self.mode in SINGLE_STEP
        steps = self.steps if self.steps is not None else (1 if single else 10)
        if steps < 1:
            raise RcompError(f"--steps must be at least 1, got {steps}")
        if single:
            steps = 1
        if self.alpha is not None:
            alpha = self.alpha
        elif self.mode == "fgsm":
            alpha = 1.25 * self.eps if self.random_start else self.eps
        elif self.mode == "n-fgsm":
            alpha = self.eps
        else:
            alpha = 2.5 * self.eps / steps
        if self.mode == "n-fgsm" and self.norm != "linf":
            raise RcompError("--adv n-fgsm is defined for --norm linf only; use fgsm or pgd with --norm l2")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise RcompError(f"--noise must be a finite number >= 0, got {self.noise}")
        if not (math.isfinite(self.grad_align) and self.grad_align >= 0):
            raise RcompError(f"--grad-align must be a finite number >= 0, got {self.grad_align}")
        if self.grad_align and not single:
            raise RcompError(f"--grad-align regularises single-step training; use it with --adv fgsm or n-fgsm, "
                             f"not {self.mode}")
        if alpha <= 0 and self.mode != "none":
            raise RcompError(f"--alpha must be positive, got {alpha}")
        if self.eps <= 0 and self.mode != "none":
            raise RcompError(f"--adv {self.mode} needs a positive --eps, e.g. --eps 8/255")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise RcompError(f"--beta must be a finite number >= 0, got {self.beta}")
        warm = self.beta_warmup or 0
        if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
            raise RcompError(f"--beta-warmup must be a whole number of steps >= 0, got {self.beta_warmup!r}")
        return AdvConfig(self.mode, self.eps, alpha, steps, self.norm, self.beta, warm, bool(self.random_start),
                         float(self.noise), float(self.grad_align))


def trades_beta(cfg: AdvConfig, step: int) -> float:
    """TRADES' ``beta`` at optimizer step ``step`` (0-based): linear from 0 over ``beta_warmup`` steps.

    Why the default is 1 (TRADES' own MNIST setting; 6 is its CIFAR-10 one). The KL term has a
    trivial minimiser, a model whose output ignores its input, where the objective is
    ``log K`` (2.30 for 10 classes). Fine-tuning a trained, non-robust checkpoint starts where
    the KL term is large: on digits at eps 0.1 a 0.98-accurate convnet8 has CE 0.07 and KL 1.2,
    so with beta 6 the objective is 7.3, far *above* the trivial point, and SGD (lr 0.01,
    momentum 0.9) walks there within one epoch: clean accuracy 0.93 -> 0.25, loss stuck at
    2.29. With beta 1 the start (1.3) is below it and the same run ends at clean 0.95, robust
    (PGD-10) 0.47 -> 0.67. A warm-up of beta (e.g. one epoch) only delays the descent at beta 6
    (clean 0.93, robust 0.66 on all of digits; still collapses on 256 images).
    """
    warm = cfg.beta_warmup
    return cfg.beta if warm <= 0 else cfg.beta * min(1.0, (step + 1) / warm)


def training_attack(cfg: AdvConfig, seed: int):
    """The adversary of training mode ``cfg.mode`` (``cfg`` resolved), from :mod:`rcomp.attacks`.

    fgsm: FGSM with random start (Wong et al. 2020), or plain FGSM with ``random_start=False``;
    n-fgsm: :class:`~rcomp.attacks.fgsm.NFGSM`; pgd: PGD keeping the last iterate (Madry et
    al. 2018); trades: :class:`~rcomp.attacks.trades.TradesKL`.
    """
    from rcomp.attacks import make_attack
    from rcomp.attacks.fgsm import NFGSM
    from rcomp.attacks.pgd import PGD
    from rcomp.attacks.trades import TradesKL

    if cfg.mode == "fgsm":
        return make_attack("fgsm", cfg.eps, norm=cfg.norm, alpha=cfg.alpha, random_start=cfg.random_start, seed=seed)
    if cfg.mode == "n-fgsm":
        return NFGSM(cfg.eps, cfg.norm, alpha=cfg.alpha, noise=cfg.noise, seed=seed)
    if cfg.mode == "pgd":
        return PGD(cfg.eps, cfg.norm, steps=cfg.steps, alpha=cfg.alpha, keep_last=True, seed=seed)
    return TradesKL(cfg.eps, cfg.norm, steps=cfg.steps, alpha=cfg.alpha, seed=seed)


def adversarial_examples(model, x, y, cfg: AdvConfig, gen: torch.Generator, seed: int):
    """Training adversarial images for ``cfg.mode`` fgsm, n-fgsm, pgd or trades (``cfg`` already resolved).

    PGD and TRADES draw their starts from ``gen`` (the step's generator, after augmentation);
    FGSM and N-FGSM from their own stream seeded with ``seed``.
    """
    was = model.training
    attack = training_attack(cfg, seed)
    x_adv = attack(model, x, y, generator=None if cfg.mode in SINGLE_STEP else gen)
    if was:
        model.train(True)  # re-run train(): some modules (fake-quant twins) re-arm observers there
    return x_adv


def _clean_logits(model, x):
    """Logits of the clean batch in eval mode, without gradient (adversarial training's clean accuracy)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train(was)
    return logits


def batch_loss(model, train_model, x, y, cfg: AdvConfig, gen: torch.Generator, seed: int):
    """Per-example training losses and the logits they were computed from.

    ``model``: the plain module (attacks differentiate it); ``train_model``: what the parameter
    gradient flows through (``model`` itself, or its DistributedDataParallel wrapper).
    Returns ``(losses, clean_logits, adv_logits)``: the clean logits give the clean training
    accuracy (for fgsm/pgd, whose loss is on the adversarial images only, from an extra
    eval-mode forward pass without gradient); ``adv_logits`` is None for ``none``.
    """
    if cfg.mode == "none":
        logits = train_model(x)
        return F.cross_entropy(logits, y, reduction="none"), logits, None
    if cfg.mode in ATTACK_MODES:
        clean = _clean_logits(model, x)
        x_adv = adversarial_examples(model, x, y, cfg, gen, seed)
        logits = train_model(x_adv)
        losses = F.cross_entropy(logits, y, reduction="none")
        if cfg.grad_align:
            losses = losses + cfg.grad_align * grad_align_term(train_model, x, y, cfg.eps, gen)
        return losses, clean, logits
    # TRADES: inner maximisation of KL(p(x) || p(x')) in eval mode, outer loss in train mode
    x_adv = adversarial_examples(model, x, y, cfg, gen, seed)
    both = train_model(torch.cat([x, x_adv]))
    logits, logits_adv = both[: len(x)], both[len(x):]
    kl = kl_loss(logits_adv, F.softmax(logits, dim=1))
    return F.cross_entropy(logits, y, reduction="none") + cfg.beta * kl, logits, logits_adv


def _input_grad(model, x, y, create_graph: bool):
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [x], create_graph=create_graph)
    return grad


def grad_align_term(model, x, y, eps: float, gen: torch.Generator) -> torch.Tensor:
    """GradAlign's per-example regulariser ``1 - cos(grad_x CE(x), grad_x CE(x + eta))``, ``eta``
    uniform in the L-inf eps ball (drawn from ``gen``), ``x + eta`` clamped to [0, 1].

    As in Andriushchenko & Flammarion's reference code: ``model`` in its training mode, the gradient
    at ``x`` detached, the one at ``x + eta`` built with ``create_graph=True`` so the loss's backward
    differentiates through it (double backpropagation) into the parameters.
    """
    g1 = _input_grad(model, x, y, create_graph=False).detach()
    eta = (torch.rand(x.shape, generator=gen, device=gen.device).to(x.device) * 2 - 1) * eps
    g2 = _input_grad(model, (x + eta).clamp(0.0, 1.0), y, create_graph=True)
    return 1.0 - F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
