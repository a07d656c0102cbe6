"""Square: a score-based black-box attack by random square-shaped updates.

Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020 (Algorithms 1-3; reference ``fra31/auto-attack``
``square.py``, as run in AutoAttack's standard suite). Random search: start from vertical stripes
of +-eps (linf) or a sum of pseudo-Gaussian blocks (l2); at each query change one random square
window of side ``s`` (the window shrinks on the schedule of the paper, from ``p_init`` of the
pixels) and keep the change only if the margin loss drops. Only forward passes of the model
itself are used -- never gradients, never a gradient surrogate -- so it runs on a real int8
model directly, and points it fools that every gradient attack missed point to gradient masking.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from rcomp.attacks.base import Attack, _bcast, attack_loss, flat_norm
from rcomp.attacks.pointwise import point_keys, point_signs
from rcomp.errors import RcompError

# (fraction of the rescaled 10000-query budget, divisor of p_init) from the reference schedule
_SCHEDULE = ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128), (6000, 256), (8000, 512))


class _ForwardOnly(nn.Module):
    """Queries ``model`` itself (no ``gradient_model``), without building autograd graphs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


class Square(Attack):
    """Square attack. Defaults (AutoAttack's): ``queries=5000`` per point, ``p_init=0.8``, margin
    loss (``loss="cw"``; targeted: the margin towards the target), one run. Costs one forward pass
    per query on the points not yet fooled (plus one at the start); a point stops being queried
    as soon as it is fooled. The window schedule is one sequence per seed and the signs are drawn
    per point (:mod:`rcomp.attacks.pointwise`), so a point's example does not depend on the batch
    it comes in.
    """

    name = "square"
    paper = "Andriushchenko et al. 2020"
    uses_gradients = False

    def __init__(self, eps: float, norm: str = "linf", *, queries: int | None = None, p_init: float = 0.8,
                 loss: str = "cw", targeted: bool = False, seed: int | None = None):
        super().__init__(eps, norm, loss=loss, targeted=targeted, seed=seed)
        queries = 5000 if queries is None else queries
        if isinstance(queries, bool) or int(queries) < 1:
            raise RcompError(f"square needs at least 1 query, got {queries}")
        if not 0 < p_init <= 1:
            raise RcompError(f"square p_init must be in (0, 1], got {p_init}")
        self.queries = int(queries)
        self.p_init = float(p_init)

    def _extra_params(self) -> dict[str, Any]:
        return {"queries": self.queries, "p_init": self.p_init, "restarts": 1, "gradients": "none (forward passes only)"}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 target: torch.Tensor | None = None) -> torch.Tensor:
        return super().__call__(_ForwardOnly(model), x, y, target)

    # ----- the random search ------------------------------------------------
    def _p(self, i: int) -> float:
        it = int(i / self.queries * 10000)
        div = 1
        for limit, d in _SCHEDULE:
            if it > limit:
                div = d
        return self.p_init / div

    def _score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        self.check_classes(logits)
        return -attack_loss(self.loss, logits, y, target), self.succeeded(logits, y, target)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        # window sizes and places: one shared sequence per seed; signs: per point (see pointwise)
        g = torch.Generator(device=x.device).manual_seed(self.seed % (2**63 - 1))
        keys = point_keys(x)
        step = self._linf_step if self.norm == "linf" else self._l2_step
        x_best = self._linf_init(x, keys, g) if self.norm == "linf" else self._l2_init(x, keys, g)
        loss, done = self._score(model, x_best, y, target)
        for i in range(self.queries):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xi, bi = x[idx], x_best[idx]
            x_new = step(xi, bi, self._p(i), g, functools.partial(point_signs, keys[idx], self.seed, i + 1))
            new_loss, fooled = self._score(model, x_new, y[idx], None if target is None else target[idx])
            better = (new_loss < loss[idx]) | fooled
            x_best[idx] = torch.where(_bcast(better, bi), x_new, bi)
            loss[idx] = torch.where(better, new_loss, loss[idx])
            done[idx] = fooled
        return x_best

    # ----- linf (Algorithm 2) -----------------------------------------------
    def _linf_init(self, x: torch.Tensor, keys: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        _, c, _, w = x.shape
        return (x + self.eps * point_signs(keys, self.seed, 0, (c, 1, w))).clamp(0.0, 1.0)

    def _window(self, p: float, c: int, h: int, w: int, g: torch.Generator, lo: int = 1) -> tuple[int, int, int]:
        s = max(int(round(math.sqrt(p * h * w))), lo)
        s = max(min(s, h - 1, w - 1), 1)
        vh = int(torch.randint(0, h - s + 1, (1,), generator=g))
        vw = int(torch.randint(0, w - s + 1, (1,), generator=g))
        return s, vh, vw

    def _linf_step(self, x: torch.Tensor, x_best: torch.Tensor, p: float, g: torch.Generator, signs_of) -> torch.Tensor:
        _, c, h, w = x.shape
        s, vh, vw = self._window(p, c, h, w, g)
        win = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        signs = signs_of((c, 1, 1))
        same = ((x[win] + self.eps * signs).clamp(0.0, 1.0) - x_best[win]).flatten(1).abs().amax(1) < 1e-7
        signs = torch.where(_bcast(same, signs), -signs, signs)  # never spend a query on no change
        x_new = x_best.clone()
        x_new[win] = (x[win] + self.eps * signs).clamp(0.0, 1.0)
        return x_new

    # ----- l2 (Algorithm 3) -------------------------------------------------
    def _l2_init(self, x: torch.Tensor, keys: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        _, c, h, w = x.shape
        s = max(h // 5, 1)
        start = (h - s * 5) // 2 if h >= 5 else 0
        delta = torch.zeros_like(x)
        blk = _pseudo_gaussian(s, g, x.device)
        places = [(vh, vw) for vh in range(start, h - s + 1, s) for vw in range(start, w - s + 1, s)]
        signs = point_signs(keys, self.seed, 0, (len(places), c, 1, 1))
        for j, (vh, vw) in enumerate(places):
            delta[:, :, vh:vh + s, vw:vw + s] += blk * signs[:, j]
        return (x + _unit(delta) * self.eps).clamp(0.0, 1.0)

    def _l2_step(self, x: torch.Tensor, x_best: torch.Tensor, p: float, g: torch.Generator, signs_of) -> torch.Tensor:
        _, c, h, w = x.shape
        s, vh, vw = self._window(p, c, h, w, g, lo=3)
        if s % 2 == 0 and s > 1:
            s -= 1
        vh2 = int(torch.randint(0, h - s + 1, (1,), generator=g))
        vw2 = int(torch.randint(0, w - s + 1, (1,), generator=g))
        delta = x_best - x
        win1 = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        win2 = (slice(None), slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s))
        mask = torch.zeros_like(x)
        mask[win1] = 1.0
        mask[win2] = 1.0
        norm_win1 = delta[win1].square().sum((-2, -1), keepdim=True).sqrt()
        norm_img = delta.square().sum((-2, -1), keepdim=True).sqrt()  # per channel, as the reference
        norm_wins = (delta * mask).square().sum((-2, -1), keepdim=True).sqrt()
        new = _pseudo_gaussian(s, g, x.device) * signs_of((c, 1, 1))
        new = new + delta[win1] / (norm_win1 + 1e-12)
        room = ((self.eps ** 2 - norm_img.square()).clamp(min=0) / c + norm_wins.square()).sqrt()
        new = new / (new.square().sum((-2, -1), keepdim=True).sqrt() + 1e-12) * room
        delta = delta.clone()
        delta[win2] = 0.0
        delta[win1] = new
        return (x + _unit(delta) * self.eps).clamp(0.0, 1.0)


def _unit(d: torch.Tensor) -> torch.Tensor:
    return d / _bcast(flat_norm(d, "l2") + 1e-12, d)


def _eta(rows: int, cols: int, device) -> torch.Tensor:
    """Concentric squares weighted 1 / (k + 1)^2 (the reference's ``eta``), unit l2 norm."""
    d = torch.zeros(rows, cols, device=device)
    r0, c0 = rows // 2, cols // 2
    for k in range(max(r0, c0) + 1):
        d[max(r0 - k, 0):min(r0 - k + 2 * k + 1, rows), max(c0 - k, 0):min(c0 - k + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
    return d / (d.square().sum().sqrt() + 1e-12)


def _pseudo_gaussian(s: int, g: torch.Generator, device) -> torch.Tensor:
    """The reference's ``meta_pseudo_gaussian_pert``: +eta on the top half, -eta on the bottom, maybe transposed."""
    d = torch.zeros(s, s, device=device)
    if s // 2:
        d[:s // 2] = _eta(s // 2, s, device)
    d[s // 2:] = -_eta(s - s // 2, s, device)
    d = d / (d.square().sum().sqrt() + 1e-12)
    if float(torch.rand(1, generator=g)) > 0.5:
        d = d.t()
    return d
