"""The training loop behind ``rcomp finetune``: standard or adversarial, resumable, distributed.

>>> from rcomp.train import TrainConfig, AdvConfig, finetune
>>> model, metrics = finetune(model, train_ds, TrainConfig(epochs=3, adv=AdvConfig("pgd", eps=0.1)))

Determinism: every random choice (validation split, shuffling, augmentation, attack starts)
comes from a torch.Generator seeded from ``(seed, epoch, step)``; the global generator (dropout)
is seeded once and saved in the training state. The same seed therefore gives bit-identical
weights on CPU, and a run resumed from a ``save_every`` state equals the uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rcomp.errors import RcompError, TrainingFailed
from rcomp.evaluation.accuracy import fetch
from rcomp.seeding import derive_seed, generator
from rcomp.train import distributed as D
from rcomp.train.adversarial import SINGLE_STEP, AdvConfig, batch_loss, trades_beta
from rcomp.train.augment import augment_batch, default_on, recipe
from rcomp.train.guards import (
    CO_BATCH,
    CO_FIX,
    FIX,
    CollapseMonitor,
    OverfitGuard,
    check_finite_loss,
    check_finite_weights,
)
from rcomp.train.optim import OPTIMIZERS, SCHEDULES, lr_at, make_optimizer, set_lr


@dataclass
class TrainConfig:
    """Options of one training run; defaults are the study's fine-tuning recipe (SGD 0.01, m 0.9)."""

    epochs: int = 3
    batch_size: int = 128            # global batch (all processes together)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "const"
    warmup: int = 0                  # epochs of linear warm-up
    adv: AdvConfig = field(default_factory=AdvConfig)
    augment: bool | None = None      # None: on for cifar10/cifar100/svhn only
    val_split: float = 0.0           # fraction of the training set held out for validation
    val_eps: float | None = None     # robust validation budget (default: adv.eps when adversarial)
    seed: int = 0
    device: str = "cpu"
    save_every: int = 0              # epochs between training-state files (0: never)
    state_path: Path | None = None
    progress: bool = True
    max_steps: int | None = None     # step budget: train exactly this many optimizer steps (replaces epochs)
    allow_collapse: bool = False     # keep a model whose training collapsed (else TrainingFailed); after a
    #                                  catastrophic overfitting (fgsm, n-fgsm) the best weights are kept
    overfit_guard: bool = True       # fgsm/n-fgsm: watch PGD accuracy on a fixed batch (rcomp.train.guards)
    snapshot_at: tuple[int, ...] = ()  # also return a copy of the model after each of these optimizer steps

    def validate(self) -> TrainConfig:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise RcompError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise RcompError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise RcompError(f"--lr must be positive, got {self.lr}")
        if self.momentum < 0 or self.momentum >= 1:
            raise RcompError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise RcompError(f"--weight-decay must not be negative, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise RcompError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise RcompError(f"unknown --schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.warmup < 0:
            raise RcompError(f"--warmup must not be negative, got {self.warmup}")
        if not 0 <= self.val_split < 1:
            raise RcompError(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.save_every < 0:
            raise RcompError(f"--save-every must not be negative, got {self.save_every}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise RcompError(f"--steps-budget must be a positive number of optimizer steps, got {self.max_steps!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.snapshot_at):
            raise RcompError(f"--save-at takes positive step counts, got {self.snapshot_at!r}")
        if self.save_every and self.state_path is None:
            raise RcompError("--save-every needs a path for the training state")
        self.adv = self.adv.resolved()
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The options a resumed run must share with the run that wrote the state."""
        d = asdict(self)
        for k in ("epochs", "device", "save_every", "state_path", "progress", "allow_collapse", "overfit_guard",
                  "snapshot_at"):
            d.pop(k)
        return d


class _Bar:
    """Fallback progress bar (stderr) used when rcomp.progress is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.post = total, desc, 0, {}

    def __enter__(self):
        return self

    def update(self, n: int = 1, **postfix):
        self.n += n
        self.post = postfix

    def __exit__(self, *exc):
        if exc[0] is None:
            post = " ".join(f"{k}={v}" for k, v in self.post.items())
            print(f"{self.desc}: {self.n}/{self.total} {post}", file=sys.stderr, flush=True)
        return False


class _Silent(_Bar):
    def __exit__(self, *exc):
        return False


def _progress(total: int, desc: str, on: bool):
    if not on:
        return _Silent(total, desc)
    try:
        from rcomp.progress import Progress
    except ImportError:
        return _Bar(total, desc)
    return Progress(total, desc)


def _trainable(model):
    """The module that is trained: the model, or the fake-quant twin of a quantized model."""
    if not getattr(model, "is_quantized", False):
        return model
    try:
        from rcomp.quant.qat import to_trainable
    except ImportError:
        raise RcompError("fine-tuning quantized checkpoints needs rcomp.quant.qat (quantization-aware "
                         "training), which this installation lacks; fine-tune before quantizing") from None
    return to_trainable(model)


def _untrain(trainable, model):
    if trainable is model:
        return model
    from rcomp.quant.qat import from_trainable

    return from_trainable(trainable, model)


def evaluate_split(model, ds, idx: list[int], cfg: TrainConfig, eps: float | None, epoch: int,
                   info: D.DistInfo, device: str) -> dict[str, float]:
    """Clean (and, with ``eps``, PGD-10 robust) accuracy on ``ds[idx]``, sharded over processes.

    Through :func:`rcomp.evaluation.robustness.evaluate`: robust counts a point only if it is
    classified correctly clean AND under the attack. Each batch is attacked whole by a PGD seeded
    from ``(seed, 7, epoch, offset)``, so the figures do not depend on the number of processes'
    batching of other points.
    """
    from rcomp.attacks import make_attack
    from rcomp.evaluation.accuracy import batches, clean_accuracy
    from rcomp.evaluation.robustness import PerBatch, evaluate

    mine = idx[info.rank::info.world]
    bs = cfg.batch_size
    if not eps:
        correct, n = clean_accuracy(model, batches(ds, mine, bs, device), device)
        c, n = D.all_sum([correct, n], info, device)
        return {"clean_acc": c / max(n, 1)}
    adv = AdvConfig("pgd", eps, None, 10, cfg.adv.norm).resolved()
    attack = PerBatch(lambda seed: make_attack("pgd", adv.eps, norm=adv.norm, steps=adv.steps,
                                               alpha=adv.alpha, seed=seed), adv.norm)
    keyed = ((*fetch(ds, mine[s:s + bs], device), derive_seed(cfg.seed, 7, epoch, s))
             for s in range(0, len(mine), bs))
    res = evaluate(model, keyed, {"pgd": attack}, device, progress=False, checks=False)
    c, r, n = D.all_sum([round(res.clean_acc * res.n), round(res.worst_case_acc * res.n), res.n], info, device)
    return {"clean_acc": c / max(n, 1), "robust_acc": r / max(n, 1)}


def split_indices(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded (train, validation) split of ``range(n)``."""
    if not val_split:
        return list(range(n)), []
    n_val = max(1, int(round(n * val_split)))
    if n_val >= n:
        raise RcompError(f"--val-split {val_split} leaves no training data ({n} examples)")
    perm = torch.randperm(n, generator=generator(derive_seed(seed, 11))).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def check_resume(resume: str | Path, cfg: TrainConfig):
    """Read a training state and check it was written with ``cfg``'s options: (info, tensors)."""
    from rcomp.train.state import load_state

    st_info, tensors = load_state(Path(resume))
    want = _jsonish(cfg.fingerprint())
    if st_info.get("fingerprint") != want:
        diff = sorted(k for k in want if st_info.get("fingerprint", {}).get(k) != want[k])
        raise RcompError(f"--resume {resume} was written with different options ({', '.join(diff)}); "
                         "resume with the options of the interrupted run")
    start = int(st_info["epoch"])
    if cfg.max_steps is None and start >= cfg.epochs:
        raise RcompError(f"--resume {resume} has already trained {start} epochs; raise --epochs above {start}")
    return st_info, tensors


def finetune(model, train_ds, config: TrainConfig | None = None, *, dataset: str | None = None,
             resume: str | Path | None = None, dist: D.DistInfo | None = None):
    """Train ``model`` (a Classifier) on ``train_ds``; returns ``(model, metrics)``.

    Pruned models are trained at their (smaller) shapes; quantized ones through their fake-quant
    twin (:mod:`rcomp.quant.qat`) and returned in their original quantization format.
    ``metrics``: ``{"epochs": [per-epoch dicts], "final": last epoch, "epoch_seconds": [...],
    "steps": optimizer steps taken, "wall_seconds": the run's wall time}``; with ``config.snapshot_at``
    also ``"snapshots"``: ``{steps: (model after that many steps, in the returned model's format,
    {"epochs": the epochs finished by then, "wall_seconds": time to then})}``. With the constant
    schedule (and warm-up, which is counted in epochs) a snapshot after N steps has the weights of a
    run of N steps; with a schedule over the whole run (step, cosine, onecycle) its learning rates
    were those of the longer run.
    A run whose loss or weights become non-finite, or that collapses to chance (unless
    ``allow_collapse``), raises :class:`~rcomp.errors.TrainingFailed` (see :mod:`.guards`).
    """
    t_start = time.perf_counter()
    cfg = (config or TrainConfig()).validate()
    run = _Run(model, train_ds, cfg, dataset, dist or D.DistInfo())
    if resume is not None:
        run.resume(resume)
    run.start_monitor()
    for epoch in range(run.start_epoch, run.end_epoch):
        run.epoch(epoch)
        if run.guard is not None and run.guard.collapse is not None:
            break
    if run.history and not cfg.allow_collapse and (run.guard is None or run.guard.collapse is None):
        run.monitor.verdict(run.history[-1])
    run.trainable.eval()
    model = _untrain(run.trainable, model)
    model.eval()
    metrics = {"epochs": run.history, "final": run.history[-1] if run.history else {},
               "epoch_seconds": run.seconds, "steps": run.steps,
               "wall_seconds": round(time.perf_counter() - t_start, 3)}
    if run.guard is not None:
        metrics["overfit_guard"] = run.guard.record(cfg.batch_size)
    if cfg.snapshot_at:
        metrics["snapshots"] = {n: (_untrain_copy(t, model), info) for n, (t, info) in run.snapshots.items()}
    return model, metrics


def _untrain_copy(trainable_copy, model):
    """A snapshot of the trained module (a copy) in ``model``'s format (quantized models: their own)."""
    if not getattr(model, "is_quantized", False):
        return trainable_copy.eval()
    return _untrain(trainable_copy, model).eval()


class _Run:
    """The state of one training run: model, optimizer, batches, history, guards."""

    def __init__(self, model, train_ds, cfg: TrainConfig, dataset: str | None, info: D.DistInfo):
        self.cfg, self.info, self.ds, self.device = cfg, info, train_ds, cfg.device
        dataset = dataset or getattr(getattr(model, "meta", None), "dataset", None)
        self.aug_on = cfg.augment if cfg.augment is not None else default_on(dataset)
        shape = model.meta.input.shape if hasattr(model, "meta") else tuple(train_ds[0][0].shape)
        self.pad, self.flip = recipe(dataset, shape[1])
        self.num_classes = getattr(getattr(model, "meta", None), "num_classes", None)
        torch.manual_seed(cfg.seed)
        self.trainable = _trainable(model).to(self.device)
        self.train_idx, self.val_idx = split_indices(len(train_ds), cfg.val_split, cfg.seed)
        self.sampler = D.GlobalBatchSampler(len(self.train_idx), cfg.batch_size, cfg.seed, True, info.rank,
                                            info.world)
        self.spe = self.sampler.num_batches()
        if self.spe < 1:
            raise RcompError(f"the training set ({len(self.train_idx)} examples) is too small for "
                             f"{info.world} processes")
        self.total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.spe
        late = [n for n in cfg.snapshot_at if n >= self.total]
        if late:
            raise RcompError(f"--save-at {late[0]}: the run takes {self.total} optimizer steps and its output is the "
                             f"model after all of them; give snapshot steps below {self.total}")
        self.snapshots: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.t_start = time.perf_counter()
        self.end_epoch = -(-self.total // self.spe)
        self.optimizer = make_optimizer(self.trainable.parameters(), cfg.optimizer, cfg.lr, cfg.momentum,
                                        cfg.weight_decay)
        self.history: list[dict[str, Any]] = []
        self.seconds: list[float] = []
        self.start_epoch = self.steps = 0
        self.train_model = None
        self.guard: OverfitGuard | None = None
        if cfg.adv.grad_align and info.enabled:
            raise RcompError("--grad-align (double backprop) is not supported under torchrun; run it in one process")
        self.val_eps = cfg.val_eps if cfg.val_eps is not None else (cfg.adv.eps if cfg.adv.mode != "none" else None)

    def resume(self, path) -> None:
        from rcomp.train.state import restore

        st_info, tensors = check_resume(path, self.cfg)
        self.start_epoch = int(st_info["epoch"])
        self.steps = self.start_epoch * self.spe
        if self.start_epoch >= self.end_epoch:
            raise RcompError(f"--resume {path} has already trained {self.start_epoch * self.spe} steps; "
                             f"raise the step budget above {self.start_epoch * self.spe}")
        restore(self.trainable, self.optimizer, st_info, tensors, str(path))
        self.trainable.to(self.device)
        self.history = list(st_info.get("history", []))

    def start_monitor(self) -> None:
        """The collapse monitor, with the clean accuracy of the starting weights (up to 512 training images)."""
        from rcomp.evaluation.accuracy import batches, clean_accuracy

        sample = self.train_idx[:512]
        correct, n = clean_accuracy(self.trainable, batches(self.ds, sample, self.cfg.batch_size, self.device),
                                    self.device)
        if self.num_classes is None:
            with torch.no_grad():
                self.num_classes = int(self.trainable.eval()(fetch(self.ds, sample[:1], self.device)[0]).shape[1])
        self.monitor = CollapseMonitor(self.num_classes, correct / max(n, 1))
        self.train_model = D.wrap(self.trainable, self.info, self.device)
        if self.cfg.adv.mode in SINGLE_STEP and self.cfg.overfit_guard:
            self.start_guard()

    def start_guard(self) -> None:
        """The catastrophic-overfitting guard's fixed batch and its first check (the starting weights)."""
        cfg = self.cfg
        pool, source = (self.val_idx, "validation images") if self.val_idx else (self.train_idx, "training images")
        perm = torch.randperm(len(pool), generator=generator(derive_seed(cfg.seed, 13))).tolist()
        x, y = fetch(self.ds, sorted(pool[i] for i in perm[:CO_BATCH]), self.device)
        self.guard = OverfitGuard(x, y, cfg.adv.eps, cfg.adv.norm, derive_seed(cfg.seed, 17), source, adv=cfg.adv)
        if self.info.is_main:
            print(f"overfitting guard: PGD-{self.guard.steps} accuracy and the training adversary's "
                  f"({self.guard.adv_name()}) on {len(y)} fixed {source} after every epoch; a collapse restores the "
                  "best weights", file=sys.stderr, flush=True)
        self.guard.check(self.trainable, self.start_epoch, None)

    def _guard_check(self, epoch: int, row: dict[str, Any]) -> None:
        """After an epoch: the guard's check; on a collapse restore the best weights, then fail or carry on."""
        if self.guard is None:
            return
        hit = self.guard.check(self.trainable, epoch + 1, row.get("train_adv_acc"))
        row["guard_pgd_acc"] = self.guard.checks[-1]["pgd"]
        row["guard_single_acc"] = self.guard.checks[-1]["single"]
        if hit is None:
            return
        self.guard.restore_best(self.trainable)
        row["overfit_collapse"] = dict(hit)
        msg = self.guard.message()
        if not self.cfg.allow_collapse:
            raise TrainingFailed(f"{msg}; nothing was written; {CO_FIX}")
        if self.info.is_main:
            print(f"warning: {msg}; writing them (--allow-collapse)", file=sys.stderr, flush=True)

    def epoch(self, epoch: int) -> None:
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        self.trainable.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, clean correct, adv correct, n
        with _progress(self.spe, f"epoch {epoch + 1}/{self.end_epoch}", cfg.progress and info.is_main) as bar:
            for b, (idx, gsize, offset) in enumerate(self.sampler.batches(epoch)):
                if self.steps >= self.total:
                    break
                sums += self._step(epoch, b, idx, gsize, offset)
                if self.steps in cfg.snapshot_at and info.is_main:
                    self._snapshot()
                n = max(float(sums[3]), 1.0)
                post = {"loss": f"{sums[0] / n:.4f}", "acc": f"{sums[1] / n:.3f}"}
                if cfg.adv.mode != "none":
                    post["adv_acc"] = f"{sums[2] / n:.3f}"
                bar.update(1, **post)
        row = self._row(epoch, D.all_sum(sums.tolist(), info))
        self._guard_check(epoch, row)
        self.history.append(row)
        self.seconds.append(time.perf_counter() - t0)
        extra = {k: v for k, v in row.items() if k not in ("epoch", "loss", "train_acc", "train_adv_acc")
                 and (k != "lr" or cfg.schedule != "const" or cfg.warmup)}
        if cfg.progress and info.is_main and extra:  # the bar already showed loss and accuracies
            print("  " + "  ".join(f"{k} {v}" for k, v in extra.items()), file=sys.stderr, flush=True)
        warning = self.monitor.epoch(row)
        if warning and info.is_main:
            print(warning, file=sys.stderr, flush=True)
        if cfg.save_every and (epoch + 1) % cfg.save_every == 0 and self.steps % self.spe == 0:
            if info.is_main:
                from rcomp.train.state import save_state

                save_state(cfg.state_path, self.trainable, self.optimizer,
                           {"epoch": epoch + 1, "history": self.history, "fingerprint": _jsonish(cfg.fingerprint())})
            D.barrier(info)

    def _snapshot(self) -> None:
        """A copy of the trained module after this step (eval mode; training goes on with the original)."""
        import copy

        snap = copy.deepcopy(self.trainable).eval()
        self.snapshots[self.steps] = (snap, {"epochs": list(self.history),
                                             "wall_seconds": round(time.perf_counter() - self.t_start, 3)})

    def _step(self, epoch: int, b: int, idx, gsize: int, offset: int) -> torch.Tensor:
        """One optimizer step on one batch; returns (loss sum, clean correct, adv correct, n)."""
        cfg, info = self.cfg, self.info
        step = epoch * self.spe + b
        set_lr(self.optimizer, lr_at(step, self.total, cfg.lr, cfg.schedule, cfg.warmup * self.spe))
        x, y = fetch(self.ds, [self.train_idx[i] for i in idx], self.device)
        gen = generator(derive_seed(cfg.seed, epoch, b))
        if self.aug_on:
            x = augment_batch(x, gen, self.pad, self.flip, gsize, offset)
        adv = replace(cfg.adv, beta=trades_beta(cfg.adv, step)) if cfg.adv.beta_warmup else cfg.adv
        losses, logits, adv_logits = batch_loss(self.trainable, self.train_model, x, y, adv, gen,
                                                derive_seed(cfg.seed, epoch, b, info.rank))
        if not info.enabled:
            check_finite_loss(losses, epoch + 1, b + 1)
        self.optimizer.zero_grad(set_to_none=True)
        (losses.sum() * (info.world / gsize)).backward()
        self.optimizer.step()
        self.steps += 1
        self._last_step = step
        with torch.no_grad():
            return torch.tensor([float(losses.sum()), float((logits.argmax(1) == y).sum()),
                                 float((adv_logits.argmax(1) == y).sum()) if adv_logits is not None else 0.0,
                                 len(y)], dtype=torch.float64)

    def _row(self, epoch: int, tot: list[float]) -> dict[str, Any]:
        cfg = self.cfg
        if not math.isfinite(tot[0]):
            raise TrainingFailed(f"training diverged in epoch {epoch + 1}: the loss became non-finite; "
                                 f"nothing was written; {FIX}")
        check_finite_weights(self.trainable, epoch + 1)
        n = max(tot[3], 1.0)
        lr = lr_at(self._last_step, self.total, cfg.lr, cfg.schedule, cfg.warmup * self.spe)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": round(lr, 8), "loss": round(tot[0] / n, 6),
                               "train_acc": round(tot[1] / n, 6)}
        if cfg.adv.mode != "none":
            row["train_adv_acc"] = round(tot[2] / n, 6)
        if self.val_idx:
            v = evaluate_split(self.trainable, self.ds, self.val_idx, cfg, self.val_eps, epoch, self.info,
                               self.device)
            row.update({f"val_{k}": round(val, 6) for k, val in v.items()})
        return row


def _jsonish(obj):
    import json

    return json.loads(json.dumps(obj, default=str))
