"""Clean and robust accuracy over a data loader, streamed batch by batch.

Per batch: one clean forward pass under ``torch.inference_mode`` serves every attack; each attack
runs on the points classified correctly clean (a point already wrong is never attacked, and
counts as non-robust); its examples are scored with one more inference-mode forward pass on the
model itself (for an int8 model: the real int8 model, whatever gradient the attack used). Nothing
is kept across batches except counters, so memory does not grow with the number of points.

Robust accuracy under an attack counts a point only if it is correct clean AND still correct on
that attack's example; the worst case counts a point only if it is correct clean and under
every attack (the per-example worst case of RobustBench/AutoAttack).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rcomp.attacks.base import flat_norm


@dataclass
class AttackResult:
    """One attack's figures over all ``n`` evaluated points."""

    params: dict[str, Any]
    robust_acc: float = 0.0
    #: fooled / attacked (the points correct clean)
    success_rate: float = 0.0
    #: perturbation size ||x_adv - x|| in the attack's norm, over the attacked points
    mean_norm: float = 0.0
    max_norm: float = 0.0
    attacked: int = 0
    seconds: float = 0.0
    #: attacked points per second of attack time (gradient computation and scoring)
    examples_per_s: float = 0.0


@dataclass
class EvalResult:
    """What :func:`evaluate` measures. Accuracies are fractions of ``n``."""

    n: int = 0
    clean_acc: float = 0.0
    robust_acc: dict[str, float] = field(default_factory=dict)
    worst_case_acc: float = 0.0
    attacks: dict[str, AttackResult] = field(default_factory=dict)
    seconds: float = 0.0
    #: evaluated points per second, everything included
    examples_per_s: float = 0.0
    gradient_source: str = "exact"

    @property
    def success_rate(self) -> dict[str, float]:
        return {k: a.success_rate for k, a in self.attacks.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Counter:
    __slots__ = ("robust", "fooled", "attacked", "norm_sum", "norm_max", "seconds")

    def __init__(self):
        self.robust = self.fooled = self.attacked = 0
        self.norm_sum = self.norm_max = self.seconds = 0.0


def evaluate(model, loader: Iterable, attacks: dict[str, Callable] | None = None, device: str = "cpu",
             progress: bool = True, *, desc: str = "evaluate",
             on_batch: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
             total: int | None = None) -> EvalResult:
    """Clean accuracy, robust accuracy per attack and worst case of ``model`` over ``loader``.

    ``attacks`` maps a display name to an attack (``attack(model, x, y) -> x_adv``, see
    :mod:`rcomp.attacks`); ``{}`` gives clean accuracy only. ``progress`` draws a bar on stderr.
    ``on_batch(x, y, {name: x_adv})``, if given, receives each batch with every attack's examples
    (for points wrong clean, ``x_adv`` is ``x``): the caller decides what to keep. The model is
    left in the train/eval mode it came in.
    """
    from rcomp.progress import Progress

    attacks = dict(attacks or {})
    counts = {name: _Counter() for name in attacks}
    n = clean = worst = 0
    was_training = model.training
    model.eval()
    if total is None:
        try:
            total = len(loader.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            total = None
    t_start = time.perf_counter()
    try:
        with Progress(total, desc, enabled=progress) as bar:
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = torch.as_tensor(y).to(device, non_blocking=True)
                with torch.inference_mode():
                    ok = model(x).argmax(1) == y
                idx = ok.nonzero().squeeze(1).clone()
                xs, ys = x[idx].clone(), y[idx].clone()
                still = ok.clone()
                advs: dict[str, torch.Tensor] = {}
                for name, attack in attacks.items():
                    c = counts[name]
                    t0 = time.perf_counter()
                    if len(idx):
                        x_adv = attack(model, xs, ys)
                        with torch.inference_mode():
                            robust_sub = model(x_adv).argmax(1) == ys
                        norms = flat_norm(x_adv - xs, _norm_of(attack))
                        c.norm_sum += float(norms.double().sum())
                        c.norm_max = max(c.norm_max, float(norms.max()))
                        c.robust += int(robust_sub.sum())
                        c.fooled += int((~robust_sub).sum())
                        c.attacked += len(idx)
                        r = torch.zeros_like(ok)
                        r[idx] = robust_sub
                        still &= r
                        if on_batch is not None:
                            full = x.clone()
                            full[idx] = x_adv
                            advs[name] = full
                    elif on_batch is not None:
                        advs[name] = x.clone()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    c.seconds += time.perf_counter() - t0
                n += len(y)
                clean += int(ok.sum())
                worst += int(still.sum())
                if on_batch is not None:
                    on_batch(x, y, advs)
                post = {"clean": clean / n}
                if attacks:
                    post["robust"] = worst / n
                bar.update(len(y), **post)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t_start
    res = EvalResult(n=n, clean_acc=clean / n if n else 0.0, worst_case_acc=worst / n if n else 0.0,
                     seconds=seconds, examples_per_s=n / seconds if seconds > 0 else 0.0,
                     gradient_source=getattr(model, "gradient_source", "exact"))
    for name, attack in attacks.items():
        c = counts[name]
        ar = AttackResult(
            params=attack.params() if hasattr(attack, "params") else {"attack": name},
            robust_acc=c.robust / n if n else 0.0,
            success_rate=c.fooled / c.attacked if c.attacked else 0.0,
            mean_norm=c.norm_sum / c.attacked if c.attacked else 0.0,
            max_norm=c.norm_max, attacked=c.attacked, seconds=c.seconds,
            examples_per_s=c.attacked / c.seconds if c.seconds > 0 else 0.0,
        )
        res.attacks[name] = ar
        res.robust_acc[name] = ar.robust_acc
    return res


def _norm_of(attack) -> str:
    return getattr(attack, "norm", "linf")


def evaluate_pairs(model, images: torch.Tensor, adv_images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 256, device: str = "cpu", name: str = "transfer",
                   norm: str = "linf") -> EvalResult:
    """Replay saved adversarial examples against ``model`` (transfer evaluation).

    A point counts as robust only if ``model`` classifies both its clean image and its
    adversarial image correctly. Streams ``batch_size`` points at a time.
    """
    n = len(labels)
    clean = robust = fooled = attacked = 0
    norm_sum = norm_max = 0.0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                x = images[s:s + batch_size].to(device).float()
                xa = adv_images[s:s + batch_size].to(device).float()
                y = labels[s:s + batch_size].to(device).long()
                ok = model(x).argmax(1) == y
                r = ok & (model(xa).argmax(1) == y)
                clean += int(ok.sum())
                robust += int(r.sum())
                attacked += int(ok.sum())
                fooled += int((ok & ~r).sum())
                if ok.any():
                    norms = flat_norm((xa - x)[ok], norm)
                    norm_sum += float(norms.double().sum())
                    norm_max = max(norm_max, float(norms.max()))
    finally:
        model.train(was_training)
    secs = time.perf_counter() - t0
    ar = AttackResult(params={"attack": name, "norm": norm}, robust_acc=robust / n if n else 0.0,
                      success_rate=fooled / attacked if attacked else 0.0,
                      mean_norm=norm_sum / attacked if attacked else 0.0, max_norm=norm_max, attacked=attacked,
                      seconds=secs, examples_per_s=n / secs if secs > 0 else 0.0)
    return EvalResult(n=n, clean_acc=clean / n if n else 0.0, robust_acc={name: ar.robust_acc},
                      worst_case_acc=ar.robust_acc, attacks={name: ar}, seconds=secs,
                      examples_per_s=n / secs if secs > 0 else 0.0,
                      gradient_source="none (replayed examples)")
