"""The one evaluation loop: clean and robust accuracy over a data loader, streamed batch by batch,
with per-example records.

Per batch: one clean forward pass under ``torch.inference_mode`` serves every attack; each attack
runs on the points classified correctly clean (a point already wrong is never attacked, and
counts as non-robust); its examples are scored with one more inference-mode forward pass on the
model itself (for an int8 model: the real int8 model, whatever gradient the attack used). Across
batches only counters are kept, plus, when asked for, the per-example :class:`Records`.

Robust accuracy under an attack counts a point only if it is correct clean AND still correct on
that attack's example; the worst case counts a point only if it is correct clean and under
every attack (the per-example worst case of RobustBench/AutoAttack).

With ``cascade=True`` each attack runs only on the points still robust after the earlier ones
(see :mod:`rcomp.evaluation.cascade`): the worst case is the same figure, for less work, and an
attack's own ``robust_acc`` then reads the robust accuracy after it and every attack before it.

Every consumer reads this loop: ``rcomp attack`` (its report, ``-o``, and ``--from``, which
replays saved examples through :func:`replay`), ``rcomp bench``, the clean accuracy of
quantize/convert, and training's validation and ``finetune --eval-attack`` figures (through
:class:`PerBatch`, an attack built per batch from the loader's third item).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rcomp.attacks.base import flat_norm
from rcomp.errors import RcompError


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
class Records:
    """Per-example results of one evaluation, in the loader's order (one row per point).

    ``stage[i]`` is the position in ``stages`` of the first attack that fooled point ``i`` (-1:
    none did, or the point was wrong clean and never attacked); ``norm[i]`` is the size of the
    kept example's perturbation; ``adv[i]`` and ``clean[i]`` (only when images were asked for) are
    the kept example -- the first one that fooled the point, else the last attack's, else the clean
    image -- and the clean image.
    A point is robust iff ``clean_correct & (stage < 0)``.
    """

    stages: list[str]
    index: torch.Tensor
    label: torch.Tensor
    clean_correct: torch.Tensor
    stage: torch.Tensor
    norm: torch.Tensor
    adv: torch.Tensor | None = None
    clean: torch.Tensor | None = None

    @property
    def robust(self) -> torch.Tensor:
        return self.clean_correct & (self.stage < 0)

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def cat(parts: list[Records], stages: list[str]) -> Records:
        def c(name, dtype):
            xs = [getattr(p, name) for p in parts]
            return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)
        def maybe(name):
            xs = [getattr(p, name) for p in parts]
            return torch.cat(xs) if xs and all(a is not None for a in xs) else None

        return Records(stages, c("index", torch.long), c("label", torch.long), c("clean_correct", torch.bool),
                       c("stage", torch.long), c("norm", torch.float32), maybe("adv"), maybe("clean"))


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
    #: AutoAttack's own checks (Croce and Hein's flags), measured on the same points: see :func:`checks_of`
    checks: dict[str, Any] | None = None
    #: per-example results (only when ``evaluate(..., records=...)`` asked for them)
    records: Records | None = field(default=None, repr=False)

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


class PerBatch:
    """An attack built afresh for each batch and run on the whole batch.

    The loop hands a plain attack only the points of a batch classified correctly clean; this
    one is built by ``make(key)`` from the loader's third item (``(x, y, key)``, e.g. a seed, or a
    batch of saved examples), attacks every point of the batch and the loop keeps the rows it
    needs, so what a point's attack draws does not depend on which other points were correct.
    """

    whole_batch = True

    def __init__(self, make: Callable[[Any], Any], norm: str = "linf", params: dict[str, Any] | None = None):
        self.make, self.norm = make, norm
        self._params: dict[str, Any] = dict(params or {})

    def for_batch(self, key: Any):
        attack = self.make(key)
        if hasattr(attack, "params"):
            self._params = attack.params()
        return attack

    def params(self) -> dict[str, Any]:
        return dict(self._params)


class _Fold:
    """The figures, folded batch by batch from each batch's per-point results (fresh or read back
    from ``--records``: the same fold, so a resumed run ends with the same bits)."""

    def __init__(self, attacks: dict[str, Any]):
        from rcomp.attacks.cascade import uses_gradients

        self.counts = [_Counter() for _ in attacks]
        self.grad = torch.tensor([uses_gradients(a) for a in attacks.values()], dtype=torch.bool)
        self.n = self.clean = self.worst = self.masked = 0
        self.flags = {"varies": 0, "softmax": 0, "zero_grad": 0}

    def add(self, t: dict[str, torch.Tensor]) -> None:
        for k in self.flags:
            if k in t:
                self.flags[k] += int(t[k].sum())
        ok, first = t["clean_correct"].bool(), t["stage"]
        attacked, robust, anorm = t["attacked"].bool(), t["robust"].bool(), t["attack_norm"]
        for a, c in enumerate(self.counts):
            att = attacked[:, a]
            m = int(att.sum())
            if m:
                norms = anorm[att, a]
                c.norm_sum += float(norms.double().sum())
                c.norm_max = max(c.norm_max, float(norms.max()))
                r = int(robust[att, a].sum())
                c.robust += r
                c.fooled += m - r
                c.attacked += m
            c.seconds += float(t["seconds"][a])
            c.stage += int((ok & ((first < 0) | (first > a))).sum())
        if len(self.counts):
            fooled = attacked & ~robust
            g = self.grad
            grad_fooled = fooled[:, g].any(1)
            covered = ok & attacked[:, g].all(1)
            free_fooled = fooled[:, ~g].any(1)
            self.masked += int((free_fooled & ~grad_fooled & covered).sum())
        self.n += len(ok)
        self.clean += int(ok.sum())
        self.worst += int((ok & (first < 0)).sum())


_RECORD_KEYS = ("index", "label", "clean_correct", "stage", "norm")


class _Everyone:
    """Rank 0's progress over a sharded evaluation: the points of the chunks every process has written,
    so the bar's rate is that of all processes together and its ETA is for the whole evaluation;
    chunks read back on ``--resume`` count as done, outside the rate."""

    def __init__(self, bar, store, done: dict[int, dict[str, Any]], total: int | None):
        self.bar, self.store, self.total = bar, store, total
        self.resumed = set(done)
        self.sizes = {b: len(t["index"]) for b, t in done.items()}
        self.full = max(self.sizes.values(), default=0)  # a batch not seen yet counts as a full one
        self.batches = 0
        bar.skip(sum(self.sizes.values()))

    def saw(self, b: int, size: int) -> None:
        self.sizes[b] = size
        self.full = max(self.full, size)
        self.batches = max(self.batches, b + 1)

    def sync(self) -> int:
        """Move the bar to the chunks on disk; returns how many there are."""
        ids = self.store.batches()
        n = sum(self.sizes.get(k, self.full) for k in ids)
        if self.total is not None:
            n = min(n, self.total)
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)
        return len(ids)


def _dataset_index(indices, pos: int, count: int, first: int) -> torch.Tensor:
    """The dataset indices of the ``count`` points at loader position ``pos``: from the loader's subset indices
    (``-n`` picks a stratified sample, so position and dataset index differ), else the positions from ``first``."""
    if indices is not None and pos + count <= len(indices):
        return torch.as_tensor(indices[pos:pos + count], dtype=torch.long)
    return torch.arange(first, first + count)


def evaluate(model, loader: Iterable, attacks: dict[str, Callable] | None = None, device: str = "cpu",
             progress: bool = True, *, desc: str = "evaluate", total: int | None = None, cascade: bool = False,
             records: bool | str = False, first_index: int = 0, store=None,
             shard: tuple[int, int] | None = None, checks: bool = True) -> EvalResult:
    """Clean accuracy, robust accuracy per attack and worst case of ``model`` over ``loader``.

    ``attacks`` maps a display name to an attack (``attack(model, x, y) -> x_adv``, see
    :mod:`rcomp.attacks`); ``{}`` gives clean accuracy only. A suite (``make_attack("auto")``)
    is expanded into its stages. ``cascade``: run each attack only on the points still robust
    after the earlier ones (always on when a suite such as ``auto`` is among the attacks).
    ``progress`` draws a bar on stderr. ``loader`` yields ``(x, y)`` or ``(x, y, key)``; ``key``
    goes to the :class:`PerBatch` attacks. ``records``: keep the per-example :class:`Records`
    (``"images"``: with the kept adversarial images), indexed from ``first_index`` in loader
    order. ``store`` (a :class:`~rcomp.evaluation.records.RecordDir`): write each batch's
    records there as it is done, and first read back the batches it already holds (resume).
    ``shard=(rank, world)`` (under torchrun, with ``store``): this process runs batches ``b`` with
    ``b % world == rank`` only, the batches themselves being those of one process, then all
    processes wait for each other and every one folds all the chunks in batch order, so the figures
    equal a one-process run's (:func:`shard_refusal` says which attacks may be sharded). ``checks``: run
    AutoAttack's checks (:func:`checks_of`; one more clean pass and one input gradient per batch). The
    model is left in the train/eval mode it came in.
    """
    from rcomp.evaluation.cascade import expand_suites, masking_checkable, wants_cascade
    from rcomp.models.layout import fast_layout
    from rcomp.progress import Progress
    from rcomp.quant.frozen import frozen_quantizers

    attacks = dict(attacks or {})
    cascade = wants_cascade(attacks, cascade)
    attacks = expand_suites(attacks)
    fold = _Fold(attacks)
    parts: list[Records] = []
    images = records == "images"
    if shard is not None and shard[1] > 1:
        if store is None:
            raise RcompError("under torchrun, give --records DIR (a folder every process can reach): the "
                             "processes hand their results to rank 0 through it")
        why = shard_refusal(attacks, cascade)
        if why:
            raise RcompError(why)
        rank, world = shard
    else:
        rank, world = 0, 1
    done = store.load() if store is not None else {}
    # attacks drawing per call (pgd, apgd, cw, fgsm's random start, --targeted): in independent mode
    # each is called once per batch with points correct clean, which every process can tell from a clean pass
    counted = [a for a in attacks.values() if not batch_independent(a)] if world > 1 else []
    if done and images and any("adv" not in t for t in done.values()):
        raise RcompError(f"--records {store.path} was made without -o, so it holds no adversarial images; "
                         "resume without -o, or start a new folder")
    was_training = model.training
    model.eval()
    # the module gradient attacks differentiate; none for an ONNX model without a surrogate (black-box only)
    surrogate = model.gradient_model() if getattr(model, "has_surrogate", True) and hasattr(model, "gradient_model") \
        else None
    # channels-last weights while attacking (tried on a 2-image batch first), put back after
    layout = fast_layout(model, surrogate, device=device, probe=lambda: _probe(model, surrogate, device))
    if total is None:
        try:
            total = len(loader.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            total = None
    t_start = time.perf_counter()
    seen = 0
    indices = getattr(loader, "indices", None)  # a subset's dataset indices (make_loader), else positions
    stack = contextlib.ExitStack()
    stack.enter_context(layout)
    # a fake-quant network's weights rounded once, not on every attack step (bit-identical; rcomp.quant.frozen)
    stack.enter_context(frozen_quantizers(model, surrogate))
    try:
        with Progress(total, desc, enabled=progress) as bar:
            # under torchrun, rank 0's bar shows every process's points (their chunks), rate and ETA included
            everyone = _Everyone(bar, store, done, total) if world > 1 and rank == 0 and progress else None
            for b, item in enumerate(loader):
                x, y = item[0], item[1]
                key = item[2] if len(item) > 2 else None
                first = first_index + seen
                seen += len(y)
                if b in done:
                    t = done[b]
                    if t["first"] != first or not torch.equal(t["label"], torch.as_tensor(y).long().cpu()):
                        raise RcompError(f"--records {store.path}: chunk {b} holds other points than this run's "
                                         "batch; resume with the same data, -n and --batch-size")
                    for attack, calls in zip(attacks.values(), t["calls"].tolist(), strict=True):
                        if hasattr(attack, "_calls"):  # where its random streams stood after this batch
                            attack._calls = int(calls)
                elif b % world != rank:
                    if counted:  # per-batch draws: move the streams on as the process attacking this batch does
                        n_ok = int(_clean_pass(model, x.to(device), torch.as_tensor(y).to(device), False)[0].sum())
                        for a in counted:
                            a.skip_call(n_ok)
                    if everyone is not None:
                        everyone.saw(b, len(y))
                    continue
                else:
                    x = x.to(device, non_blocking=True)
                    y = torch.as_tensor(y).to(device, non_blocking=True)
                    ok, flags = _clean_pass(model, x, y, checks=checks and bool(attacks))
                    book, secs = attack_batch(model, x, y, ok, attacks, cascade, device, key, keep=images)
                    t = {"index": _dataset_index(indices, first - first_index, len(y), first), "label": y.cpu().long(),
                         "clean_correct": ok.cpu(), "stage": book.first.cpu(), "norm": book.norm.cpu(),
                         "attacked": book.attacked.cpu(), "robust": book.robust.cpu(),
                         "attack_norm": book.attack_norm.cpu(), "seconds": torch.tensor(secs, dtype=torch.float64),
                         "calls": torch.tensor([int(getattr(a, "_calls", -1)) for a in attacks.values()],
                                               dtype=torch.long), **flags}
                    if images:
                        t["adv"], t["clean"] = book.kept.cpu(), x.cpu()
                    if store is not None:
                        store.write(b, first, t)
                if world > 1:  # the bar counts the points of every process (their chunks on disk)
                    if everyone is not None:
                        everyone.saw(b, len(y))
                        everyone.sync()
                    continue
                fold.add(t)
                if records:
                    parts.append(Records(list(attacks), *(t[k] for k in _RECORD_KEYS),
                                         t.get("adv") if images else None, t.get("clean") if images else None))
                post = {"clean": fold.clean / fold.n}
                if attacks:
                    post["robust"] = fold.worst / fold.n
                if b in done:
                    bar.skip(len(t["index"]))
                    bar.update(0, **post)
                else:
                    bar.update(len(t["index"]), **post)
            if everyone is not None:  # rank 0 done with its own batches: show the others' until all are in
                while everyone.sync() < everyone.batches:
                    time.sleep(0.2)
        if world > 1:  # every process has written its chunks: fold them all, in batch order
            from rcomp.train.distributed import DistInfo, barrier

            barrier(DistInfo(rank, world))
            loaded = store.load()
            for t in (loaded[b] for b in sorted(loaded)):
                fold.add(t)
                if records:
                    parts.append(Records(list(attacks), *(t[k] for k in _RECORD_KEYS),
                                         t.get("adv") if images else None, t.get("clean") if images else None))
    finally:
        try:
            stack.close()  # weights and quantizers back first: a module's train() may touch them
        finally:
            model.train(was_training)
    seconds = time.perf_counter() - t_start
    n = fold.n
    seeds = {getattr(a, "seed", None) for a in attacks.values()}
    res = EvalResult(n=n, clean_acc=fold.clean / n if n else 0.0, worst_case_acc=fold.worst / n if n else 0.0,
                     seconds=seconds, examples_per_s=n / seconds if seconds > 0 else 0.0,
                     gradient_source=getattr(model, "gradient_source", "exact"),
                     mode="cascade" if cascade else "independent",
                     seed=seeds.pop() if len(seeds) == 1 else None,
                     gradient_masking_suspected=fold.masked if masking_checkable(attacks, cascade) else None,
                     records=Records.cat(parts, list(attacks)) if records else None)
    for (name, attack), c in zip(attacks.items(), fold.counts, strict=True):
        _fill(res, name, attack, c, n)
    if attacks and checks:
        res.checks = checks_of(res, fold.flags, attacks)
    return res


def _probe(model, surrogate, device: str) -> None:
    """A forward pass of ``model`` and of its gradient ``surrogate`` on two random images (eval mode)."""
    from rcomp.attacks.base import eval_mode

    shape = getattr(getattr(getattr(model, "meta", None), "input", None), "shape", None)
    if shape is None:
        return
    x = torch.rand(2, *shape, device=device)
    with torch.no_grad(), eval_mode(*(m for m in (model, surrogate) if m is not None)):
        for m in (model, surrogate):
            if m is not None:
                m(x)


def _clean_pass(model, x, y, checks: bool):
    """Clean correctness, and per point the flags of AutoAttack's checks: outputs that differ between
    two passes (a randomised model), outputs that look like probabilities (softmax instead of
    logits), a zero input gradient of the cross-entropy (on the gradients the attacks use)."""
    with torch.inference_mode():
        out = model(x)
        ok = out.argmax(1) == y
        if not checks:
            return ok, {}
        again = model(x)
        varies = (out - again).abs().flatten(1).amax(1) > 0
        rowsum = out.float().sum(1)
        softmax = (out >= 0).all(1) & (out <= 1).all(1) & ((rowsum - 1).abs() < 1e-3)
    flags = {"varies": varies.cpu(), "softmax": softmax.cpu()}
    if str(getattr(model, "gradient_source", "exact")).startswith("none"):
        return ok, flags  # no gradients (an ONNX file without a surrogate): nothing to check
    try:
        gm = model.gradient_model() if hasattr(model, "gradient_model") else model
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().float().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(gm(xg), y.detach().clone().long(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, [xg])
        flags["zero_grad"] = ((grad.abs().flatten(1).amax(1) == 0) & ok).cpu()
    except (RuntimeError, RcompError):  # a model with no gradient at all: nothing to check (the attacks say so)
        pass
    return ok, flags


#: the APGD-T stage fooling this fraction of all points more than APGD-CE did flags saturated CE gradients
CE_T_GAP = 0.1


def checks_of(res: EvalResult, flags: dict[str, int], attacks: dict[str, Any]) -> dict[str, Any]:
    """AutoAttack's checks (its ``flags_doc``), counted on this evaluation's points, with a warning
    line for each that fired: a randomised model; softmax outputs; zero gradients at clean points;
    Square lowering the figure after the gradient stages (``gradient_masking_suspected``); a large
    gap between APGD-CE and APGD-T (saturated cross-entropy gradients)."""
    gap = None
    ce = [k for k, a in attacks.items() if getattr(a, "name", None) == "apgd" and getattr(a, "loss", None) == "ce"]
    tt = [k for k, a in attacks.items() if getattr(a, "name", None) == "apgd-t"]
    if ce and tt:
        if res.mode == "cascade":
            gap = res.stage_robust_acc[ce[0]] - res.stage_robust_acc[tt[0]]
        else:
            gap = res.robust_acc[ce[0]] - res.robust_acc[tt[0]]
    warn = []
    if flags["varies"]:
        warn.append(f"randomised model: {flags['varies']} point(s) got different outputs from two passes; "
                    "attack it with EOT, and do not trust a single run's figure")
    if flags["softmax"]:
        warn.append(f"the model's outputs look like probabilities on {flags['softmax']} point(s) (softmax instead "
                    "of logits?): cross-entropy gradients vanish; return logits")
    if flags["zero_grad"]:
        warn.append(f"{flags['zero_grad']} point(s) correct clean have a zero gradient: gradient attacks cannot "
                    "move them (masked gradients); trust the gradient-free stages")
    if res.gradient_masking_suspected:
        warn.append(f"a gradient-free attack fooled {res.gradient_masking_suspected} point(s) every gradient attack "
                    "missed: gradient masking suspected")
    if gap is not None and gap >= CE_T_GAP:
        warn.append(f"APGD-T fooled {gap:.1%} of the points APGD-CE missed: the cross-entropy gradients look "
                    "saturated (scaled logits?); trust the DLR/targeted figures")
    return {"randomized": flags["varies"], "softmax_output": flags["softmax"], "zero_gradients": flags["zero_grad"],
            "square_after_gradients": res.gradient_masking_suspected, "apgd_ce_t_gap": gap, "warnings": warn}


def shard_refusal(attacks: dict[str, Any], cascade: bool) -> str | None:
    """Why ``attacks`` (expanded) cannot be split over processes with the figures of one process, or None.

    Attacks drawing per point (:func:`batch_independent`) always can. An attack drawing per call
    (pgd, apgd, cw, fgsm with a random start, --targeted) can in independent mode: each process
    moves its random streams on over the batches of the others (:meth:`~rcomp.attacks.base.Attack.skip_call`,
    knowing from one clean pass whether the batch is attacked). In a cascade, whether it is called on
    a batch depends on what the attacks before it did there, which only their process knows -- except for
    the first, which runs on the points correct clean as in independent mode (``pgd,auto``)."""
    moving = [k for k, a in attacks.items() if not batch_independent(a)]
    if not moving:
        return None
    unknown = [k for k in moving if not hasattr(attacks[k], "skip_call")]
    if unknown:
        return (f"{', '.join(unknown)} cannot tell how its random numbers depend on the batch, so splitting the "
                "points over processes could change the result; run it in one process")
    moving = [k for k in moving if k != next(iter(attacks))] if cascade else moving
    if cascade and moving:
        return (f"{', '.join(moving)} draw(s) random numbers per call, and in a cascade which batches call it "
                "depends on the attacks before it; list it first, run the cascade in one process, or run without "
                "--cascade (or with attacks that draw per point: auto, apgd-t, square, fgsm)")
    return None


def batch_independent(attack) -> bool:
    """Whether ``attack``'s example for a point depends only on the point, the seed and the attack
    (per-point draws: auto's stages, apgd-t, square, fgsm without a random start), not on the other
    points of its batch nor on how many batches came before: what sharding needs."""
    from rcomp.attacks.fgsm import FGSM
    from rcomp.attacks.pointwise import PointwiseStart
    from rcomp.attacks.square import Square

    if getattr(attack, "targeted", False):
        return False  # random target classes, drawn per batch
    if isinstance(attack, (PointwiseStart, Square)):
        return True
    return isinstance(attack, FGSM) and not getattr(attack, "random_start_on", True)


def attack_batch(model, x, y, ok, attacks, cascade: bool = True, device: str = "cpu", key=None,
                 keep: bool = False):
    """Run every attack on its points of one batch: ``(book, seconds per attack)``. The
    :class:`~rcomp.attacks.cascade.BatchBook` says, per point and attack, who ran, who fooled it
    first, and (``keep``) holds the example kept for it."""
    from rcomp.attacks.cascade import BatchBook

    book = BatchBook(ok, cascade, x if keep else None, stages=len(attacks))
    secs = []
    for i, attack in enumerate(attacks.values()):
        t0 = time.perf_counter()
        idx = book.pool()
        if len(idx):
            run = attack.for_batch(key) if hasattr(attack, "for_batch") else attack
            ys = y[idx].clone()
            if getattr(attack, "whole_batch", False):
                x_adv = run(model, x.clone(), y.clone())[idx]
                xs = x[idx]
            else:
                xs = x[idx].clone()
                x_adv = run(model, xs, ys)
            with torch.inference_mode():
                robust_sub = model(x_adv).argmax(1) == ys
            book.record(attack, i, idx, robust_sub, x_adv, flat_norm(x_adv - xs, _norm_of(attack)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
    return book, secs


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


def _saved(batch):
    """The 'attack' of :func:`replay`: hand back the saved examples of the batch."""
    return lambda model, x, y: batch


def replay(model, images: torch.Tensor, adv_images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
           device: str = "cpu", name: str = "transfer", norm: str = "linf", params: dict[str, Any] | None = None,
           records: bool = False) -> EvalResult:
    """Replay saved adversarial examples against ``model`` (transfer evaluation), through :func:`evaluate`.

    A point counts as robust only if ``model`` classifies both its clean image and its saved
    adversarial image correctly. Streams ``batch_size`` points at a time.
    """
    n = len(labels)

    def loader():
        for s in range(0, n, batch_size):
            yield (images[s:s + batch_size].float(), labels[s:s + batch_size].long(),
                   adv_images[s:s + batch_size].to(device).float())

    attack = PerBatch(_saved, norm, {"attack": name, "norm": norm, **(params or {})})
    res = evaluate(model, loader(), {name: attack}, device, progress=False, total=n, records=records, checks=False)
    res.gradient_source = "none (replayed examples)"
    return res


def evaluate_pairs(model, images: torch.Tensor, adv_images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 256, device: str = "cpu", name: str = "transfer",
                   norm: str = "linf") -> EvalResult:
    """:func:`replay` under its former name."""
    return replay(model, images, adv_images, labels, batch_size, device, name, norm)
