"""Clean and robust accuracy over a data loader, streamed batch by batch.

Per batch: one clean forward pass under ``torch.inference_mode`` serves every attack; each attack
runs on the points classified correctly clean (a point already wrong is never attacked, and
counts as non-robust); its examples are scored with one more inference-mode forward pass on the
model itself (for an int8 model: the real int8 model, whatever gradient the attack used). Nothing
is kept across batches except counters, so memory does not grow with the number of points.

Robust accuracy under an attack counts a point only if it is correct clean AND still correct on
that attack's example; the worst case counts a point only if it is correct clean and under
every attack (the per-example worst case of RobustBench/AutoAttack).

With ``cascade=True`` each attack runs only on the points still robust after the earlier ones
(see :mod:`rcomp.evaluation.cascade`): the worst case is the same figure, for less work, and an
attack's own ``robust_acc`` then reads the robust accuracy after it and every attack before it.
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
    #: "independent" (every attack on every point correct clean) or "cascade"
    mode: str = "independent"
    #: the seed every attack used, when they share one (each attack's params hold its own)
    seed: int | None = None
    #: attack key -> robust accuracy after that attack and every attack before it, in order
    stage_robust_acc: dict[str, float] = field(default_factory=dict)
    #: points a gradient-free attack fooled that every gradient attack missed; None: not checked
    gradient_masking_suspected: int | None = None

    @property
    def success_rate(self) -> dict[str, float]:
        return {k: a.success_rate for k, a in self.attacks.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Counter:
    __slots__ = ("robust", "fooled", "attacked", "norm_sum", "norm_max", "seconds", "stage")

    def __init__(self):
        self.robust = self.fooled = self.attacked = self.stage = 0
        self.norm_sum = self.norm_max = self.seconds = 0.0


def evaluate(model, loader: Iterable, attacks: dict[str, Callable] | None = None, device: str = "cpu",
             progress: bool = True, *, desc: str = "evaluate",
             on_batch: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
             total: int | None = None, cascade: bool = False) -> EvalResult:
    """Clean accuracy, robust accuracy per attack and worst case of ``model`` over ``loader``.

    ``attacks`` maps a display name to an attack (``attack(model, x, y) -> x_adv``, see
    :mod:`rcomp.attacks`); ``{}`` gives clean accuracy only. A suite (``make_attack("auto")``)
    is expanded into its stages. ``cascade``: run each attack only on the points still robust
    after the earlier ones (always on when a suite such as ``auto`` is among the attacks). ``progress`` draws a bar on stderr. ``on_batch(x, y, {name: x_adv})``, if given,
    receives each batch with every attack's examples (for points an attack did not run on --
    wrong clean, or fooled earlier in a cascade -- ``x_adv`` is ``x``): the caller decides what
    to keep. The model is left in the train/eval mode it came in.
    """
    from rcomp.evaluation.cascade import expand_suites, masking_checkable, wants_cascade
    from rcomp.progress import Progress

    attacks = dict(attacks or {})
    cascade = wants_cascade(attacks, cascade)
    attacks = expand_suites(attacks)
    counts = {name: _Counter() for name in attacks}
    n = clean = worst = masked = 0
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
                book = _attack_batch(model, x, y, ok, attacks, counts, cascade, device, on_batch)
                n += len(y)
                clean += int(ok.sum())
                worst += int(book.still.sum())
                masked += book.masked()
                post = {"clean": clean / n}
                if attacks:
                    post["robust"] = worst / n
                bar.update(len(y), **post)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t_start
    seeds = {getattr(a, "seed", None) for a in attacks.values()}
    res = EvalResult(n=n, clean_acc=clean / n if n else 0.0, worst_case_acc=worst / n if n else 0.0,
                     seconds=seconds, examples_per_s=n / seconds if seconds > 0 else 0.0,
                     gradient_source=getattr(model, "gradient_source", "exact"),
                     mode="cascade" if cascade else "independent",
                     seed=seeds.pop() if len(seeds) == 1 else None,
                     gradient_masking_suspected=masked if masking_checkable(attacks, cascade) else None)
    for name, attack in attacks.items():
        _fill(res, name, attack, counts[name], n)
    return res


def _attack_batch(model, x, y, ok, attacks, counts, cascade: bool, device: str, on_batch):
    """Run every attack on its points of one batch (see :class:`~rcomp.evaluation.cascade.BatchBook`)."""
    from rcomp.evaluation.cascade import BatchBook

    book = BatchBook(ok, cascade)
    advs: dict[str, torch.Tensor] = {}
    for name, attack in attacks.items():
        c = counts[name]
        t0 = time.perf_counter()
        idx = book.pool()
        full = x.clone() if on_batch is not None else None
        if len(idx):
            xs, ys = x[idx].clone(), y[idx].clone()
            x_adv = attack(model, xs, ys)
            with torch.inference_mode():
                robust_sub = model(x_adv).argmax(1) == ys
            norms = flat_norm(x_adv - xs, _norm_of(attack))
            c.norm_sum += float(norms.double().sum())
            c.norm_max = max(c.norm_max, float(norms.max()))
            c.robust += int(robust_sub.sum())
            c.fooled += int((~robust_sub).sum())
            c.attacked += len(idx)
            book.record(attack, idx, robust_sub)
            if full is not None:
                full[idx] = x_adv
        if full is not None:
            advs[name] = full
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        c.seconds += time.perf_counter() - t0
        c.stage += int(book.still.sum())
    if on_batch is not None:
        on_batch(x, y, advs)
    return book


def _fill(res: EvalResult, name: str, attack, c: _Counter, n: int) -> None:
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
    res.stage_robust_acc[name] = c.stage / n if n else 0.0


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
