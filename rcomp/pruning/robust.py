"""Robustness-aware channel importance: scores from the adversarial loss instead of the weights.

Two criteria, both handed to torch-pruning's dependency graph like any other importance, so the
result is an ordinary pruned network that saves and reloads without pickle:

* ``taylor`` with ``adv_eps`` - the first-order Taylor estimate |w * dL/dw| (Molchanov, Mallya,
  Tyree, Frosio and Kautz, "Importance Estimation for Neural Network Pruning", CVPR 2019) where
  ``L`` is the loss on PGD adversarial examples (Madry et al., ICLR 2018) rather than on clean
  batches: a channel scores high when removing it would raise the *adversarial* loss.
  :func:`adversarial_batches` makes those examples.
* ``hydra`` - learned channel scores (Sehwag, Wang, Mittal and Jana, "HYDRA: Pruning
  Adversarially Robust Neural Networks", NeurIPS 2020), here per channel instead of per weight:
  every prunable layer gets one score per output channel, initialised from its filter L1 norms;
  the layer's output is multiplied by a top-k mask of the scores (straight-through
  gradient to the scores), and the scores alone are optimised against the adversarial loss for
  a short budget while the weights stay frozen. :class:`LearnedImportance` hands the scores to
  torch-pruning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _attack_model(net: nn.Module, normalize: nn.Module) -> nn.Module:
    return nn.Sequential(normalize, net)


def adversarial_batches(net: nn.Module, normalize: nn.Module, batches: list, eps: float, steps: int,
                        seed: int = 0) -> list:
    """``batches`` with every image replaced by its PGD-``steps`` adversarial example at ``eps`` (pixels)."""
    from rcomp.attacks import make_attack

    attack = make_attack("pgd", eps, steps=steps, seed=seed)
    model = _attack_model(net, normalize)
    dev = next(net.parameters()).device
    return [(attack(model, x.to(dev), y.to(dev)), y.to(dev)) for x, y in batches]


def prunable_layers(net: nn.Module, skip) -> dict[str, nn.Module]:
    """Conv and Linear layers whose output channels may be pruned (``skip``: names never pruned)."""
    return {n: m for n, m in net.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and n not in set(skip)}


#: what a masked channel still passes forward, so that a following ReLU lets its gradient through
#: (a channel masked to exactly 0 sits at ReLU's kink, gets no gradient and could never come back)
LEAK = 1e-3


def _channel_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Top-k mask of ``scores`` (k = round(keep * n), at least 1; the others pass ``LEAK``) with a
    straight-through gradient to the scores."""
    k = max(1, int(round(keep * scores.numel())))
    hard = torch.full_like(scores, LEAK)
    hard[scores.detach().topk(k).indices] = 1.0
    return hard + scores - scores.detach()


def _init_scores(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in layers.items():
        w = mod.weight.detach().flatten(1).abs().sum(1)
        out[name] = (w / w.max().clamp_min(1e-12)).clone().requires_grad_(True)
    return out


def learn_channel_scores(net: nn.Module, normalize: nn.Module, batches: list, *, keep: float, skip, eps: float,
                         attack_steps: int = 5, steps: int = 100, lr: float = 0.1,
                         seed: int = 0) -> dict[nn.Module, torch.Tensor]:
    """HYDRA-style scores (Sehwag et al., NeurIPS 2020): one per output channel of every prunable layer.

    For ``steps`` optimisation steps (cycling over ``batches``), PGD-``attack_steps`` examples at
    ``eps`` are made against the *masked* network (each layer keeps the top ``keep`` fraction of its
    channels by score), and Adam lowers their cross-entropy by moving the scores only (weights and
    BatchNorm statistics stay as they are). Returns ``{module: scores}``, larger = more important.
    """
    from rcomp.attacks import make_attack

    layers = prunable_layers(net, skip)
    scores = _init_scores(layers)
    hooks = [mod.register_forward_hook(
        lambda m, i, o, s=scores[name]: o * _channel_mask(s, keep).view(1, -1, *([1] * (o.dim() - 2))))
        for name, mod in layers.items()]
    was_training, grads_on = net.training, [p.requires_grad for p in net.parameters()]
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(list(scores.values()), lr=lr)
    attack = make_attack("pgd", eps, steps=attack_steps, seed=seed)
    model = _attack_model(net, normalize)
    dev = next(iter(scores.values())).device
    try:
        for i in range(steps):
            x, y = batches[i % len(batches)]
            x, y = x.to(dev), y.to(dev)
            x_adv = attack(model, x, y)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_adv), y).backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
        for p, on in zip(net.parameters(), grads_on, strict=True):
            p.requires_grad_(on)
        net.train(was_training)
    return {layers[n]: s.detach().abs() for n, s in scores.items()}


def learned_importance(scores: dict | None = None):
    """A torch-pruning importance returning learned per-channel ``scores`` (``{module: 1-D tensor}``).

    torch-pruning 1.6.1 asks the importance for one score per channel of a *group* (coupled layers
    pruned together); each layer of the group with scores contributes them and the group averages
    them (then divides by the mean, as torch-pruning's own criteria do)."""
    import torch_pruning as tp
    from torch_pruning.pruner import function

    out_fns = (function.prune_conv_out_channels, function.prune_linear_out_channels)

    class LearnedImportance(tp.importance.GroupMagnitudeImportance):
        def __init__(self, table):
            super().__init__(group_reduction="mean", normalizer="mean")
            self.scores = table or {}

        @torch.no_grad()
        def __call__(self, group):
            imps, idxs = [], []
            for i, (dep, ch) in enumerate(group):
                table = self.scores.get(dep.layer) if dep.pruning_fn in out_fns else None
                if table is not None:
                    imps.append(table[ch].float())
                    idxs.append(group[i].root_idxs)
            return self._normalize(self._reduce(imps, idxs), self.normalizer) if imps else None

    return LearnedImportance(scores)


def hydra_prepare(net: nn.Module, importance, *, normalize: nn.Module, batches: list, adv: dict, keep: float,
                  ignored: list[str], seed: int, **_) -> None:
    """Learn the channel scores hydra prunes by, before each pruning step."""
    importance.scores = learn_channel_scores(net, normalize, batches, keep=keep, skip=ignored, eps=adv["eps"],
                                             attack_steps=adv["attack_steps"], steps=adv["score_steps"], seed=seed)
