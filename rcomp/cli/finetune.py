"""``rcomp finetune``: standard or adversarial training, from a checkpoint or an architecture."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from rcomp.cli.common import (
    CkptArg,
    ConfigOpt,
    DataDirOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    SeedOpt,
    TrustOpt,
    default_output,
    emit_json,
    emit_path,
    input_checkpoint,
    log,
    parse_eps,
    parse_json_kwargs,
    parse_number,
    parse_shape,
    resolve_device,
    resolve_output,
    seed_everything,
)
from rcomp.errors import RcompError

_DEFAULT_LR = {"sgd": 0.01, "adam": 3e-3, "adamw": 3e-3}


def finetune(
    ckpt: CkptArg = None,
    arch: Annotated[str | None, typer.Option(
        "--arch", help="Train from scratch: registry name (rcomp info --models) or package.module:factory. "
                       "With CKPT: names the user factory the checkpoint was made with.",
        show_default=False)] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes", help="With --arch: classes (default: the "
                                                    "dataset's).", show_default=False)] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="With --arch: C,H,W (default: the "
                                                    "dataset's native shape, digits 1,8,8).",
                                                    show_default=False)] = None,
    arch_kwargs: Annotated[str | None, typer.Option("--arch-kwargs", help="With --arch: JSON constructor "
                                                    "arguments.", show_default=False)] = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs to train (the study fine-tunes for 3).")] = 3,
    adv: Annotated[str, typer.Option("--adv", help="none, fgsm (fast AT, Wong et al. 2020), pgd (Madry et al. "
                                                   "2018) or trades (Zhang et al. 2019).")] = "none",
    eps: Annotated[str, typer.Option("--eps", help="Attack budget in [0,1] pixel units, e.g. 8/255 (CIFAR) or "
                                                   "0.1 (MNIST-like).")] = "8/255",
    alpha: Annotated[str | None, typer.Option("--alpha", help="Attack step size (default: 1.25 eps for fgsm, "
                                                              "2.5 eps / steps for pgd and trades).",
                                              show_default=False)] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Attack steps for pgd/trades (default 10).",
                                              show_default=False)] = None,
    norm: Annotated[str, typer.Option("--norm", help="Threat model: linf or l2.")] = "linf",
    beta: Annotated[float, typer.Option("--beta", help="TRADES robustness weight.")] = 6.0,
    optimizer: Annotated[str | None, typer.Option(
        "--optimizer", help="sgd, adam or adamw (default: sgd for a checkpoint, adam for --arch).",
        show_default=False)] = None,
    lr: Annotated[str | None, typer.Option("--lr", help="Peak learning rate (default: 0.01 for sgd, 3e-3 for "
                                                        "adam/adamw).", show_default=False)] = None,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay.")] = 0.0,
    schedule: Annotated[str, typer.Option("--schedule", help="const, step (x0.1 at 50% and 75%), cosine or "
                                                             "onecycle.")] = "const",
    warmup: Annotated[int, typer.Option("--warmup", help="Epochs of linear learning-rate warm-up.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="GLOBAL batch size (split over torchrun "
                                                                 "processes).")] = 128,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="Random crops (and flips for "
                                                 "natural images) (default: on for cifar10, cifar100, svhn).",
                                                 show_default=False)] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="Fraction of the training set held out; clean "
                                                                 "and robust (PGD-10) accuracy on it each "
                                                                 "epoch.")] = 0.0,
    eval_n: Annotated[int, typer.Option("--eval-n", help="Test images for the final clean/robust evaluation "
                                                         "(0: skip).")] = 1000,
    n: Annotated[int | None, typer.Option("-n", help="Train on the first N training images only.",
                                          show_default=False)] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="Write a resumable training state every K "
                                                                 "epochs, to OUT with suffix .state.safetensors "
                                                                 "(0: never).")] = 0,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue from a state written by "
                                                                 "--save-every (give the same options).",
                                                show_default=False)] = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    trust: TrustOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train or fine-tune a classifier, optionally adversarially; prints the output path.

    From CKPT it fine-tunes (pruned models stay pruned, quantized ones train through their
    fake-quant twin and keep their format); with --arch and no CKPT it trains from scratch.
    Defaults: SGD lr 0.01 momentum 0.9 constant schedule for a checkpoint (the study's recipe),
    Adam lr 3e-3 for --arch; batch 128; PGD 10 steps of 2.5 eps/steps; FGSM from a random
    start with step 1.25 eps. The same --seed gives bit-identical output on CPU. Under
    `torchrun --nproc-per-node N -m rcomp finetune ...` it trains with DistributedDataParallel
    (gloo on CPU, nccl on GPU); --batch-size stays the global batch; only rank 0 writes.

    Examples:

    \b
      rcomp finetune --arch convnet8 --data digits --epochs 20 --batch-size 64 -o dense.safetensors
      rcomp finetune model.prune0.5.safetensors --data digits --adv pgd --eps 0.1 --epochs 3
      rcomp finetune model.safetensors --data cifar10 --adv fgsm --eps 8/255 --schedule onecycle \\
        --lr 0.2 --epochs 15 --save-every 1 -o robust.safetensors
      torchrun --nproc-per-node 2 -m rcomp finetune --arch convnet8 --data digits -o ddp.safetensors
    """
    from tabulate import tabulate

    from rcomp.data.registry import check_fits, data_info, get_dataset
    from rcomp.io.checkpoint import load, save
    from rcomp.io.format import history_entry
    from rcomp.train import AdvConfig, TrainConfig
    from rcomp.train import distributed as D
    from rcomp.train.adversarial import MODES
    from rcomp.train.loop import check_resume, evaluate_split
    from rcomp.train.loop import finetune as train

    # ---- options ------------------------------------------------------------
    if epochs < 1:
        raise RcompError(f"--epochs must be at least 1, got {epochs}")
    if adv not in MODES:
        raise RcompError(f"unknown --adv {adv!r}; choose one of {', '.join(MODES)}")
    opt_name = optimizer or ("adam" if ckpt is None and arch is not None else "sgd")
    if opt_name not in _DEFAULT_LR:
        raise RcompError(f"unknown --optimizer {opt_name!r}; choose one of sgd, adam, adamw")
    lr_v = parse_number(lr, "--lr") if lr is not None else _DEFAULT_LR[opt_name]
    if lr_v <= 0:
        raise RcompError(f"--lr must be positive, got {lr}")
    eps_v = parse_eps(eps)
    alpha_v = parse_eps(alpha, "--alpha") if alpha is not None else None
    if eval_n < 0:
        raise RcompError(f"--eval-n must not be negative, got {eval_n}")
    info = data_info(data)
    dev = resolve_device(device)
    dist, dev = D.setup(dev)
    try:
        # ---- model -----------------------------------------------------------
        seed_everything(seed)
        piped = _piped_path() if ckpt is None and arch is not None else None
        if ckpt is None and arch is not None and piped is None:
            model, source = _build(arch, num_classes, input_shape, arch_kwargs, data, info, data_dir, trust), None
        else:
            if input_shape or num_classes or arch_kwargs:
                raise RcompError("--num-classes, --input-shape and --arch-kwargs only apply with --arch and no CKPT")
            source = input_checkpoint(ckpt if piped is None else piped)
            model = load(source, factory=arch, trust_factory=trust)
        if output is None and source is None:
            output = Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{arch}-{data}") + (
                "" if adv == "none" else f"-{adv}") + ".safetensors")
        out = resolve_output(output, source, "ft" if adv == "none" else f"ft-{adv}", force)
        state_path = default_output(out, "state") if save_every else None
        if state_path is not None and state_path.exists() and not force and (
                resume is None or state_path.resolve() != Path(resume).resolve()):
            raise RcompError(f"training state {state_path} already exists; pass --force, resume from it with "
                             f"--resume {state_path}, or choose another -o")
        train_ds = get_dataset(data, "train", model.meta.input, data_dir, seed=seed)
        check_fits(train_ds, model.meta.num_classes, data)
        if n is not None:
            if n < 1:
                raise RcompError(f"-n must be at least 1, got {n}")
            train_ds = _first(train_ds, n)
        cfg = TrainConfig(
            epochs=epochs, batch_size=batch_size, optimizer=opt_name, lr=lr_v, momentum=momentum,
            weight_decay=weight_decay, schedule=schedule, warmup=warmup,
            adv=AdvConfig(adv, eps_v, alpha_v, steps, norm, beta), augment=augment, val_split=val_split,
            seed=seed, device=dev, save_every=save_every, state_path=state_path,
        ).validate()
        if resume is not None:
            check_resume(resume, cfg)
        if dist.is_main:
            what = f"{model.meta.arch.name} from scratch" if source is None else str(source)
            log(f"training {what} on {data} ({len(train_ds)} images) for {epochs} epochs, adv {adv}"
                + (f" eps {eps_v:.4g} {cfg.adv.norm} steps {cfg.adv.steps} alpha {cfg.adv.alpha:.4g}"
                   if adv != "none" else "") + f", {opt_name} lr {lr_v:g} {schedule}, batch {batch_size}"
                + (f" over {dist.world} processes" if dist.enabled else ""))
        model, metrics = train(model, train_ds, cfg, dataset=data, resume=resume, dist=dist)

        # ---- final evaluation, summary, history ---------------------------------
        test_metrics = {}
        if eval_n:
            test_ds = get_dataset(data, "test", model.meta.input, data_dir, seed=seed)
            idx = list(range(min(eval_n, len(test_ds))))
            res = evaluate_split(model, test_ds, idx, cfg,
                                 eps_v if adv != "none" else None, 10_000, dist, dev)
            test_metrics = {f"test_{k}": round(v, 6) for k, v in res.items()}
            test_metrics["test_n"] = len(idx)
        if not dist.is_main:
            return
        rows = [[r.get(k, "") for k in ("epoch", "lr", "loss", "train_acc", "train_adv_acc", "val_clean_acc",
                                        "val_robust_acc")] for r in metrics["epochs"]]
        log(tabulate(rows, headers=["epoch", "lr", "loss", "train acc", "train adv acc", "val clean",
                                    "val robust"], tablefmt="simple"))
        if test_metrics:
            log("test: " + ", ".join(f"{k[5:]} {v}" for k, v in test_metrics.items()))
        params = {"source": str(source) if source else None, "arch": model.meta.arch.name, "data": data,
                  "epochs": epochs, "adv": adv, "eps": eps_v if adv != "none" else None,
                  "alpha": cfg.adv.alpha if adv != "none" else None,
                  "steps": cfg.adv.steps if adv != "none" else None, "norm": norm,
                  "beta": beta if adv == "trades" else None, "optimizer": opt_name, "lr": lr_v,
                  "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule, "warmup": warmup,
                  "batch_size": batch_size, "augment": augment, "val_split": val_split, "n": n, "seed": seed,
                  "processes": dist.world, "resumed": resume is not None}
        if model.meta.dataset is None:
            model.meta.dataset = data
        model.meta.history.append(history_entry(
            "finetune", params, model.source_sha256 if source else None,
            {"epochs": metrics["epochs"], **test_metrics}))
        model.cpu()
        sha = save(model, out, force=force, inputs=(source,) if source else ())
        log(f"wrote {out} ({model.num_parameters():,} parameters, sha256 {sha[:12]})")
        if json_out:
            emit_json({"path": str(out), "sha256": sha, "epochs": metrics["epochs"], **test_metrics})
        else:
            emit_path(out)
    finally:
        D.teardown(dist)


def _piped_path() -> Path | None:
    """With --arch and no CKPT: a checkpoint path piped on stdin (then --arch names its factory)."""
    import sys

    if sys.stdin is None or sys.stdin.isatty():
        return None
    lines = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
    return Path(lines[-1]) if lines else None


def _build(arch, num_classes, input_shape, arch_kwargs, data, info, data_dir, trust):
    from rcomp.data.registry import dataset_classes, get_dataset
    from rcomp.spec import InputSpec
    from rcomp.models.registry import build_model

    shape = parse_shape(input_shape) if input_shape else info.shape
    c = shape[0]
    mean = list(info.mean) if len(info.mean) == c else [sum(info.mean) / len(info.mean)] * c
    std = list(info.std) if len(info.std) == c else [sum(info.std) / len(info.std)] * c
    nc = num_classes
    classes = list(info.classes) if info.classes else None
    if nc is None:
        nc = info.num_classes or dataset_classes(get_dataset(data, "train", InputSpec(c, shape[1], shape[2], mean,
                                                                                       std), data_dir))
    if classes is not None and len(classes) != nc:
        classes = None
    return build_model(arch, nc, shape, mean, std, parse_json_kwargs(arch_kwargs), dataset=data,
                       class_names=classes, trust_factory=trust)


def _first(ds, n: int):
    if n >= len(ds):
        return ds
    if hasattr(ds, "subset"):
        return ds.subset(range(n))
    from torch.utils.data import Subset

    sub = Subset(ds, range(n))
    sub.num_classes = getattr(ds, "num_classes", None)
    return sub
