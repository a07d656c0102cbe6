"""The training loop behind ``rcomp finetune``: standard or adversarial, resumable, distributed.

>>> from rcomp.train import TrainConfig, AdvConfig, finetune
>>> model, metrics = finetune(model, train_ds, TrainConfig(epochs=3, adv=AdvConfig("pgd", eps=0.1)))

Determinism: every random choice (validation split, shuffling, augmentation, attack starts)
comes from a torch.Generator seeded from ``(seed, epoch, step)``; the global generator (dropout)
is seeded once and saved in the training state. The same seed therefore gives bit-identical
weights on CPU, and a run resumed from a ``save_every`` state equals the uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rcomp.errors import RcompError
from rcomp.train import distributed as D
from rcomp.train.adversarial import AdvConfig, adversarial_examples, batch_loss
from rcomp.train.augment import DEFAULT_ON, augment_batch, recipe
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
        if self.save_every and self.state_path is None:
            raise RcompError("--save-every needs a path for the training state")
        self.adv = self.adv.resolved()
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The options a resumed run must share with the run that wrote the state."""
        d = asdict(self)
        for k in ("epochs", "device", "save_every", "state_path", "progress"):
            d.pop(k)
        return d


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**62)
    return s


def _fetch(ds, idx: list[int], device: str):
    images = getattr(ds, "images", None)
    if isinstance(images, torch.Tensor) and not isinstance(ds, torch.utils.data.Subset):
        t = torch.as_tensor(idx, dtype=torch.long)
        x, y = images[t], ds.labels[t]
    else:
        items = [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
    return x.to(device), y.to(device)


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

    Robust counts a point only if it is classified correctly clean AND under the attack.
    """
    was = model.training
    model.eval()
    mine = idx[info.rank::info.world]
    attack = AdvConfig("pgd", eps, None, 10, cfg.adv.norm).resolved() if eps else None
    gen = torch.Generator().manual_seed(_seed(cfg.seed, 7, epoch))
    correct = robust = 0
    for s in range(0, len(mine), cfg.batch_size):
        x, y = _fetch(ds, mine[s:s + cfg.batch_size], device)
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        correct += int(ok.sum())
        if attack is not None:
            x_adv = adversarial_examples(model, x, y, attack, gen, _seed(cfg.seed, 7, epoch, s), evaluate=True)
            with torch.no_grad():
                robust += int((ok & (model(x_adv).argmax(1) == y)).sum())
    model.train(was)
    c, r, n = D.all_sum([correct, robust, len(mine)], info, device)
    out = {"clean_acc": c / max(n, 1)}
    if attack is not None:
        out["robust_acc"] = r / max(n, 1)
    return out


def split_indices(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded (train, validation) split of ``range(n)``."""
    if not val_split:
        return list(range(n)), []
    n_val = max(1, int(round(n * val_split)))
    if n_val >= n:
        raise RcompError(f"--val-split {val_split} leaves no training data ({n} examples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, 11))).tolist()
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
    if start >= cfg.epochs:
        raise RcompError(f"--resume {resume} has already trained {start} epochs; raise --epochs above {start}")
    return st_info, tensors


def finetune(model, train_ds, config: TrainConfig | None = None, *, dataset: str | None = None,
             resume: str | Path | None = None, dist: D.DistInfo | None = None):
    """Train ``model`` (a Classifier) on ``train_ds``; returns ``(model, metrics)``.

    Pruned models are trained at their (smaller) shapes; quantized ones through their fake-quant
    twin (:mod:`rcomp.quant.qat`) and returned in their original quantization format.
    ``metrics``: ``{"epochs": [per-epoch dicts], "final": last epoch, "epoch_seconds": [...]}``.
    """
    cfg = (config or TrainConfig()).validate()
    info = dist or D.DistInfo()
    device = cfg.device
    dataset = dataset or getattr(getattr(model, "meta", None), "dataset", None)
    aug_on = cfg.augment if cfg.augment is not None else dataset in DEFAULT_ON
    shape = model.meta.input.shape if hasattr(model, "meta") else tuple(train_ds[0][0].shape)
    pad, flip = recipe(dataset, shape[1])

    torch.manual_seed(cfg.seed)
    trainable = _trainable(model).to(device)
    train_idx, val_idx = split_indices(len(train_ds), cfg.val_split, cfg.seed)
    sampler = D.GlobalBatchSampler(len(train_idx), cfg.batch_size, cfg.seed, True, info.rank, info.world)
    spe = sampler.num_batches()
    if spe < 1:
        raise RcompError(f"the training set ({len(train_idx)} examples) is too small for {info.world} processes")
    total = cfg.epochs * spe
    optimizer = make_optimizer(trainable.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    history: list[dict[str, Any]] = []
    start = 0
    if resume is not None:
        from rcomp.train.state import restore

        st_info, tensors = check_resume(resume, cfg)
        start = int(st_info["epoch"])
        restore(trainable, optimizer, st_info, tensors, str(resume))
        trainable.to(device)
        history = list(st_info.get("history", []))
    train_model = D.wrap(trainable, info, device)
    val_eps = cfg.val_eps if cfg.val_eps is not None else (cfg.adv.eps if cfg.adv.mode != "none" else None)
    seconds = []
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        trainable.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, correct, adv correct, n
        with _progress(spe, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and info.is_main) as bar:
            for b, (idx, gsize, offset) in enumerate(sampler.batches(epoch)):
                step = epoch * spe + b
                set_lr(optimizer, lr_at(step, total, cfg.lr, cfg.schedule, cfg.warmup * spe))
                x, y = _fetch(train_ds, [train_idx[i] for i in idx], device)
                gen = torch.Generator().manual_seed(_seed(cfg.seed, epoch, b))
                if aug_on:
                    x = augment_batch(x, gen, pad, flip, gsize, offset)
                losses, logits, adv_logits = batch_loss(trainable, train_model, x, y, cfg.adv, gen,
                                                        _seed(cfg.seed, epoch, b, info.rank))
                optimizer.zero_grad(set_to_none=True)
                (losses.sum() * (info.world / gsize)).backward()
                optimizer.step()
                with torch.no_grad():
                    sums += torch.tensor([float(losses.sum()), float((logits.argmax(1) == y).sum()),
                                          float((adv_logits.argmax(1) == y).sum()) if adv_logits is not None
                                          else 0.0, len(y)], dtype=torch.float64)
                n = max(float(sums[3]), 1.0)
                post = {"loss": f"{sums[0] / n:.4f}", "acc": f"{sums[1] / n:.3f}"}
                if adv_logits is not None:
                    post["adv_acc"] = f"{sums[2] / n:.3f}"
                bar.update(1, **post)
        tot = D.all_sum(sums.tolist(), info)
        n = max(tot[3], 1.0)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": round(lr_at(step, total, cfg.lr, cfg.schedule,
                                                                         cfg.warmup * spe), 8),
                               "loss": round(tot[0] / n, 6), "train_acc": round(tot[1] / n, 6)}
        if cfg.adv.mode != "none":
            row["train_adv_acc"] = round(tot[2] / n, 6)
        if val_idx:
            v = evaluate_split(trainable, train_ds, val_idx, cfg, val_eps, epoch, info, device)
            row.update({f"val_{k}": round(val, 6) for k, val in v.items()})
        history.append(row)
        seconds.append(time.perf_counter() - t0)
        if cfg.progress and info.is_main:
            print("  " + "  ".join(f"{k} {v}" for k, v in row.items()), file=sys.stderr, flush=True)
        if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
            if info.is_main:
                from rcomp.train.state import save_state

                save_state(cfg.state_path, trainable, optimizer,
                           {"epoch": epoch + 1, "history": history, "fingerprint": _jsonish(cfg.fingerprint())})
            D.barrier(info)
    trainable.eval()
    model = _untrain(trainable, model)
    model.eval()
    return model, {"epochs": history, "final": history[-1] if history else {}, "epoch_seconds": seconds}


def _jsonish(obj):
    import json

    return json.loads(json.dumps(obj, default=str))
