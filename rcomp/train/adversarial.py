"""Per-batch training objectives: standard, fast FGSM, PGD and TRADES adversarial training.

* ``none``: cross-entropy on clean images.
* ``fgsm``: fast adversarial training (Wong, Rice & Kolter, ICLR 2020): one signed-gradient step
  of size ``alpha`` (default 1.25 eps) from a uniform random start in the eps-ball.
* ``pgd``: PGD adversarial training (Madry et al., ICLR 2018): ``steps`` steps (default 10) of size
  ``alpha`` (default 2.5 eps / steps) from a random start; cross-entropy on the result.
* ``trades``: TRADES (Zhang et al., ICML 2019): CE(clean) + beta * KL(p(clean) || p(adv)), the
  adversarial image maximising the KL term from a small Gaussian start (0.001).

Every adversarial image lies within eps of the clean one in pixel space and in [0, 1]. FGSM
examples come from :func:`rcomp.attacks.make_attack` (the code behind ``rcomp attack``), as do the
robust validation and test figures (PGD). PGD and TRADES training use :func:`pgd` below, the
same projected steps but returning the *final* iterate as in Madry et al. (``rcomp attack``'s
PGD keeps the first point that fools the model, which is right for evaluation but a weaker
training adversary). Attacks differentiate ``model.gradient_model()`` when the model has one,
run it in eval mode and compute input gradients only (no parameter ``.grad``). Losses are
returned *per example* so that distributed training can weight its shards exactly (see
:mod:`.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcomp.errors import RcompError

MODES = ("none", "fgsm", "pgd", "trades")
NORMS = ("linf", "l2")


@dataclass
class AdvConfig:
    mode: str = "none"
    eps: float = 8 / 255
    alpha: float | None = None
    steps: int | None = None
    norm: str = "linf"
    beta: float = 6.0

    def resolved(self) -> AdvConfig:
        """Fill in the defaults: fgsm alpha 1.25 eps; pgd/trades 10 steps of 2.5 eps / steps."""
        if self.mode not in MODES:
            raise RcompError(f"unknown --adv {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.norm not in NORMS:
            raise RcompError(f"unknown --norm {self.norm!r}; choose linf or l2")
        steps = self.steps if self.steps is not None else (1 if self.mode == "fgsm" else 10)
        if steps < 1:
            raise RcompError(f"--steps must be at least 1, got {steps}")
        if self.mode == "fgsm":
            steps = 1
        alpha = self.alpha if self.alpha is not None else (1.25 * self.eps if self.mode == "fgsm"
                                                           else 2.5 * self.eps / steps)
        if alpha <= 0 and self.mode != "none":
            raise RcompError(f"--alpha must be positive, got {alpha}")
        if self.eps <= 0 and self.mode != "none":
            raise RcompError(f"--adv {self.mode} needs a positive --eps, e.g. --eps 8/255")
        return AdvConfig(self.mode, self.eps, alpha, steps, self.norm, self.beta)


def _project(x_adv, x, eps, norm):
    if norm == "linf":
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
    else:
        d = x_adv - x
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        x_adv = x + d * torch.clamp(eps / n, max=1.0)
    return x_adv.clamp(0.0, 1.0)


def _step(grad, alpha, norm):
    if norm == "linf":
        return alpha * grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
    return alpha * grad / n


def pgd(model, x, y, eps, alpha, steps, norm="linf", *, gen=None, start="uniform", loss_fn=None):
    """Projected gradient ascent on ``loss_fn(logits, y)`` (default summed CE) within the eps-ball.

    ``start``: ``uniform`` (random point of the ball), ``gauss`` (0.001 N(0, 1), TRADES) or ``zero``.
    Runs ``model`` in eval mode and restores its mode; returns a detached tensor.
    """
    net = model.gradient_model() if hasattr(model, "gradient_model") else model
    was_training = net.training
    net.eval()
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, reduction="sum"))
    try:
        if start == "uniform":
            if norm == "linf":
                delta = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1).to(x.device) * eps
            else:
                d = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
                d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
                r = torch.rand(x.shape[0], generator=gen, dtype=x.dtype).to(x.device)
                delta = d * (r * eps).view(-1, *[1] * (x.dim() - 1))
        elif start == "gauss":
            delta = 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        else:
            delta = torch.zeros_like(x)
        x_adv = _project(x + delta, x, eps, norm).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(net(x_adv), y)
                (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = _project(x_adv.detach() + _step(grad, alpha, norm), x, eps, norm).detach()
        return x_adv
    finally:
        net.train(was_training)


def adversarial_examples(model, x, y, cfg: AdvConfig, gen: torch.Generator, seed: int, *, evaluate: bool = False):
    """Adversarial images for ``cfg.mode`` fgsm or pgd (``cfg`` already resolved).

    ``evaluate``: use ``rcomp attack``'s PGD (for robust accuracy figures) instead of the
    training adversary.
    """
    from rcomp.attacks import make_attack

    was = model.training
    if cfg.mode == "fgsm":
        attack = make_attack("fgsm", cfg.eps, norm=cfg.norm, alpha=cfg.alpha, random_start=True, seed=seed)
        x_adv = attack(model, x, y).detach()
    elif evaluate:
        attack = make_attack("pgd", cfg.eps, norm=cfg.norm, steps=cfg.steps, alpha=cfg.alpha, seed=seed)
        x_adv = attack(model, x, y).detach()
    else:
        x_adv = pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps, cfg.norm, gen=gen)
    if was:
        model.train(True)  # re-run train(): some modules (fake-quant twins) re-arm observers there
    return x_adv


def batch_loss(model, train_model, x, y, cfg: AdvConfig, gen: torch.Generator, seed: int):
    """Per-example training losses and the logits they were computed from.

    ``model``: the plain module (attacks differentiate it); ``train_model``: what the parameter
    gradient flows through (``model`` itself, or its DistributedDataParallel wrapper).
    For fgsm/pgd the logits are those of the adversarial images (so their accuracy is the robust
    training accuracy); for none and trades, of the clean ones.
    """
    if cfg.mode == "none":
        logits = train_model(x)
        return F.cross_entropy(logits, y, reduction="none"), logits, None
    if cfg.mode in ("fgsm", "pgd"):
        x_adv = adversarial_examples(model, x, y, cfg, gen, seed)
        logits = train_model(x_adv)
        return F.cross_entropy(logits, y, reduction="none"), logits, logits
    # TRADES: inner maximisation of KL(p(x) || p(x')) in eval mode, outer loss in train mode
    with torch.no_grad():
        was = model.training
        model.eval()
        p_nat = F.softmax(model(x), dim=1)
        model.train(was)

    def kl_sum(logits, _):
        return F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")

    x_adv = pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps, cfg.norm, gen=gen, start="gauss", loss_fn=kl_sum)
    if was:
        model.train(True)
    both = train_model(torch.cat([x, x_adv]))
    logits, logits_adv = both[: len(x)], both[len(x):]
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="none").sum(1)
    return F.cross_entropy(logits, y, reduction="none") + cfg.beta * kl, logits, logits_adv
