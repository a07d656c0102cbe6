"""The finetune stage: standard or adversarial training, from a checkpoint or an architecture."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcomp import options as O
from rcomp.attacks.catalog import EVAL_CHOICES, NORMS
from rcomp.errors import RcompError
from rcomp.stages import common as C
from rcomp.train.catalog import ADV_MODES, DEFAULT_LR, OPTIMIZERS, SCHEDULES, SINGLE_STEP

SUMMARY = "Train or fine-tune a classifier, optionally adversarially; prints the output path."
DOC = """From CKPT it fine-tunes (pruned models stay pruned, quantized ones train through their
fake-quant twin and keep their format); with --arch and no CKPT it trains from scratch.
Defaults: SGD lr 0.01 momentum 0.9 constant schedule for a checkpoint (the study's recipe),
Adam lr 3e-3 for --arch; batch 128; PGD 10 steps of 2.5 eps/steps; FGSM from a random
start with step 1.25 eps; N-FGSM noise 2 eps, step eps, no projection. Single-step runs (fgsm,
n-fgsm) are watched for catastrophic overfitting: PGD-5 and the training adversary on a fixed
batch each epoch; when PGD accuracy falls far below its best, or the training adversary leaves
high accuracy that PGD takes away (the gap), the best weights are restored and the run exits 1 (--allow-collapse writes them). The same --seed gives bit-identical output on CPU. Under
`torchrun --nproc-per-node N -m rcomp finetune ...` it trains with DistributedDataParallel
(gloo on CPU, nccl on GPU); --batch-size stays the global batch; only rank 0 writes."""
EXAMPLES = """rcomp finetune --arch convnet8 --data digits --epochs 20 --batch-size 64 -o dense.safetensors
rcomp finetune model.prune0.5.safetensors --data digits --adv pgd --eps 0.1 --epochs 3
rcomp finetune model.safetensors --data cifar10 --adv fgsm --eps 8/255 --schedule onecycle \\
  --lr 0.2 --epochs 15 --save-every 1 -o robust.safetensors
torchrun --nproc-per-node 2 -m rcomp finetune --arch convnet8 --data digits -o ddp.safetensors"""


@dataclass
class Config:
    arch: str | None = O.opt(None, "--arch", file_check=C.user_factory_from_file,
                           help="Train from scratch: registry name (rcomp info --models) or package.module:factory. "
                                "With CKPT: names the user factory the checkpoint was made with.")
    num_classes: int | None = O.opt(None, "--num-classes", kind="int", min=1, max=10**6,
                                  help="With --arch: classes (default: the dataset's).")
    input_shape: tuple[int, int, int] | None = O.opt(None, "--input-shape", kind="shape",
                                                   help="With --arch: C,H,W (default: the dataset's native shape, "
                                                        "digits 1,8,8; an image folder's own image size).")
    arch_kwargs: dict | None = O.opt(None, "--arch-kwargs", kind="json", help="With --arch: JSON constructor arguments.")
    data: str | None = O.data_opt(None, help=C.DATA_HELP[:-1] + " (default: the one the checkpoint records; "
                                             "required with --arch).")
    data_dir: Path | None = O.data_dir_opt()
    epochs: int = O.opt(3, "--epochs", kind="int", min=1, max=100000, help="Epochs to train (the study fine-tunes for 3).")
    steps_budget: int | None = O.opt(None, "--steps-budget", kind="int", min=1, max=10**9,
                                   help="Stop after exactly N optimizer steps (a training budget in cost, not "
                                        "epochs; at most --epochs epochs).")
    budget_of: Path | None = O.opt(None, "--budget-of", kind="path",
                                   help="A checkpoint whose recorded training cost --budget-fraction is a "
                                        "fraction of (e.g. the adversarially trained baseline).")
    budget_fraction: float | None = O.opt(None, "--budget-fraction", kind="float", min=0, min_open=True, max=100,
                                          help="Train for this fraction of --budget-of's training cost, counted "
                                               "in forward+backward passes (sets the step budget).")
    adv: str = O.opt("none", "--adv", kind="choice", choices=ADV_MODES,
                   help="none, fgsm (fast AT, Wong et al. 2020), n-fgsm (de Jorge et al. 2022: noise uniform in "
                        "[-2 eps, 2 eps], step eps, no projection to the eps ball), pgd (Madry et al. 2018) or "
                        "trades (Zhang et al. 2019). Cost a step in passes: none 1, fgsm/n-fgsm 2, pgd 1+steps, "
                        "trades 2+steps.")
    eps: float = O.opt(8 / 255, "--eps", kind="eps", help="Attack budget in [0,1] pixel units, e.g. 8/255 (CIFAR) or "
                                                         "0.1 (MNIST-like). [default: 8/255]")
    alpha: float | None = O.opt(None, "--alpha", kind="eps", help="Attack step size (default: 1.25 eps for fgsm, "
                                                                "eps for fgsm --no-random-start and n-fgsm, "
                                                                "2.5 eps / steps for pgd and trades).")
    random_start: bool = O.opt(True, "--random-start", kind="bool", secondary="--no-random-start",
                               help="fgsm: start from a uniform point of the eps ball (Wong et al. 2020); "
                                    "--no-random-start is plain FGSM training, prone to catastrophic overfitting.")
    noise: float = O.opt(2.0, "--noise", kind="float", min=0, max=100,
                         help="n-fgsm: noise uniform in [-K eps, K eps] (de Jorge et al. 2022: K = 2).")
    grad_align: float = O.opt(0.0, "--grad-align", kind="float", min=0, max=10**6,
                              help="GradAlign weight lambda (Andriushchenko & Flammarion 2020) for fgsm/n-fgsm: adds "
                                   "lambda * (1 - cos(grad at x, grad at x + uniform noise in the eps ball)); "
                                   "double backprop, 4 more passes a step (0: off).")
    steps: int | None = O.opt(None, "--steps", kind="int", min=1, max=1000,
                            help="Attack steps for pgd/trades (default 10).")
    norm: str = O.opt("linf", "--norm", kind="choice", choices=NORMS, help="Threat model: " + " or ".join(NORMS) + ".")
    beta: float = O.opt(1.0, "--beta", kind="float", min=0, max=1000,
                        help="TRADES robustness weight (Zhang et al.'s MNIST value; their CIFAR-10 value 6 collapses "
                             "a trained digits model to chance).")
    beta_warmup: int = O.opt(0, "--beta-warmup", kind="int", min=0, max=10**9,
                             help="TRADES: raise beta linearly from 0 over this many optimizer steps.")
    optimizer: str | None = O.opt(None, "--optimizer", kind="choice", choices=OPTIMIZERS,
                                help="sgd, adam or adamw (default: sgd for a checkpoint, adam for --arch).")
    lr: float | None = O.opt(None, "--lr", kind="number", min=0, min_open=True, max=10,
                           help="Peak learning rate (default: 0.01 for sgd, 3e-3 for adam/adamw).")
    momentum: float = O.opt(0.9, "--momentum", kind="float", min=0, max=1, max_open=True, help="SGD momentum.")
    weight_decay: float = O.opt(0.0, "--weight-decay", kind="float", min=0, max=1, help="Weight decay.")
    schedule: str = O.opt("const", "--schedule", kind="choice", choices=SCHEDULES,
                        help="const, step (x0.1 at 50% and 75%), cosine or onecycle.")
    warmup: int = O.opt(0, "--warmup", kind="int", min=0, max=100000, help="Epochs of linear learning-rate warm-up.")
    batch_size: int = O.batch_opt(128, "GLOBAL batch size (split over torchrun processes).")
    augment: bool | None = O.opt(None, "--augment", kind="bool", secondary="--no-augment",
                               help="Random crops (and flips for natural images) (default: on for cifar10, cifar100, "
                                    "svhn).")
    val_split: float = O.opt(0.0, "--val-split", kind="float", min=0, max=1, max_open=True,
                           help="Fraction of the training set held out; clean and robust (PGD-10) accuracy on it "
                                "each epoch.")
    eval_n: int = O.opt(1000, "--eval-n", kind="int", min=0, max=10**8,
                        help="Test images for the final clean/robust evaluation (0: skip); a stratified sample of the split "
                             "(fixed subset seed 0), the points bench -n N uses.")
    eval_attack: str = O.opt("pgd", "--eval-attack", kind="choice", choices=EVAL_CHOICES,
                             help="The final robust evaluation's attack at --eps: pgd (PGD-10, cheap) or auto "
                                  "(AutoAttack's suite as a cascade, the figure to trust).")
    n: int | None = O.opt(None, "-n", kind="int", min=1, max=10**9,
                           help="Train on N training images only: a stratified sample of the split (fixed subset "
                                "seed 0).")
    save_every: int = O.opt(0, "--save-every", kind="int", min=0, max=100000,
                          help="Write a resumable training state every K epochs, to OUT with suffix "
                               ".state.safetensors (0: never).")
    save_at: tuple[int, ...] = O.opt((), "--save-at", kind="ints", min=1, max=10**9,
                                     help="Also write the model after each of these optimizer steps (e.g. 9,36,67 "
                                          "with --steps-budget 90: four budgets from one run), to OUT with the "
                                          "step count in its name: its trailing -sN replaced, else -sN appended "
                                          "(ft-s90.safetensors -> ft-s9.safetensors). Each records its own "
                                          "steps, so its cost. With the const schedule it has the weights of a "
                                          "run of that many steps; a step/cosine/onecycle schedule runs over "
                                          "the whole run.")
    resume: Path | None = O.opt(None, "--resume", kind="path",
                              help="Continue from a state written by --save-every (give the same options).")
    allow_collapse: bool = O.opt(False, "--allow-collapse", kind="bool",
                               help="Write the model even when training collapsed (accuracy at chance or a loss "
                                    "that stopped moving) or overfitted catastrophically (fgsm/n-fgsm: then the "
                                    "best weights by PGD accuracy are written); by default such a run exits 1 and "
                                    "writes nothing.")
    output: Path | None = O.output_opt()
    force: bool = O.force_opt()
    device: str = O.device_opt("auto")
    seed: int = O.seed_opt()
    trust_factory: bool = O.trust_opt()
    json: bool = O.json_opt()

    def check(self) -> None:
        if (self.budget_of is None) != (self.budget_fraction is None):
            raise RcompError("give --budget-of CKPT and --budget-fraction F together (e.g. --budget-fraction 0.2)")
        if self.budget_of is not None and self.steps_budget is not None:
            raise RcompError("give either --steps-budget or --budget-of/--budget-fraction, not both")
        if self.alpha is not None and self.alpha <= 0:
            raise RcompError(f"--alpha must be positive, got {self.alpha}")
        if self.adv != "none" and self.eps <= 0:
            raise RcompError(f"--adv {self.adv} needs a positive --eps, e.g. --eps 8/255")
        if self.grad_align and self.adv not in SINGLE_STEP:
            raise RcompError(f"--grad-align regularises single-step training; use it with --adv fgsm or n-fgsm, "
                             f"not {self.adv}")
        if self.save_at:
            self.save_at = tuple(sorted(set(self.save_at)))
            if self.allow_collapse:
                raise RcompError("--save-at writes snapshots of a run that finished without a collapse; drop "
                                 "--allow-collapse, or --save-at")
            if self.resume is not None:
                raise RcompError("--save-at needs the whole run (a resumed run skips the steps before its state); "
                                 "drop --resume, or --save-at")
            if self.steps_budget is not None and self.save_at[-1] >= self.steps_budget:
                raise RcompError(f"--save-at {self.save_at[-1]}: the run takes {self.steps_budget} optimizer steps "
                                 "(--steps-budget) and its output is the model after all of them; give snapshot "
                                 f"steps below {self.steps_budget}")
        if self.adv == "n-fgsm" and self.norm != "linf":
            raise RcompError("--adv n-fgsm is defined for --norm linf only; use fgsm or pgd with --norm l2")
        C.check_data(self.data, self.data_dir)


def build(cfg: Config, log=C.stderr_log):
    """A new model of ``cfg.arch`` shaped for ``cfg.data`` (its native input shape unless given)."""
    from rcomp.data.registry import data_info, dataset_classes, get_dataset, native_shape
    from rcomp.models.registry import build_model
    from rcomp.spec import InputSpec

    if not cfg.data:
        raise RcompError(f"training {cfg.arch} from scratch needs a dataset: give --data NAME (e.g. --data digits)")
    info = data_info(cfg.data)
    shape, note = cfg.input_shape, None
    if shape is None:
        shape, note = native_shape(cfg.data, cfg.data_dir)
    c = shape[0]
    mean = list(info.mean) if len(info.mean) == c else [sum(info.mean) / len(info.mean)] * c
    std = list(info.std) if len(info.std) == c else [sum(info.std) / len(info.std)] * c
    nc = cfg.num_classes
    classes = list(info.classes) if info.classes else None
    if nc is None:
        nc = info.num_classes or dataset_classes(get_dataset(cfg.data, "train", InputSpec(c, shape[1], shape[2], mean,
                                                                                           std), cfg.data_dir))
    if classes is not None and len(classes) != nc:
        classes = None
    model = build_model(cfg.arch, nc, shape, mean, std, dict(cfg.arch_kwargs or {}), dataset=cfg.data,
                        class_names=classes, trust_factory=cfg.trust_factory)
    if note:
        log(f"{note} (--input-shape overrides)")
    return model


def _default_output(cfg: Config, source: Path | None) -> Path | None:
    if cfg.output is not None or source is not None:
        return cfg.output
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.arch}-{cfg.data}") + ("" if cfg.adv == "none" else f"-{cfg.adv}")
    return Path(name + ".safetensors")


def snapshot_path(out: Path, steps: int) -> Path:
    """Where ``--save-at STEPS`` writes: ``OUT`` with its trailing ``-sN`` replaced by ``-sSTEPS``, else with
    ``-sSTEPS`` appended (``ft-s90.safetensors`` -> ``ft-s9.safetensors``, ``ft.safetensors`` -> ``ft-s9...``)."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.stem
    base = re.sub(r"-s\d+$", "", stem)
    return out.with_name(f"{base}-s{steps}.safetensors")


def extra_outputs(cfg: Config) -> list[Path]:
    """The files the stage writes besides its output (the recipe engine names and stamps them): the snapshots."""
    return [snapshot_path(cfg.output, n) for n in cfg.save_at] if cfg.output is not None else []


def _snapshot_paths(cfg: Config, out: Path | None, inputs: tuple) -> dict[int, Path]:
    """``{steps: path}`` of the snapshots, each checked as an output before any training."""
    from rcomp.io.atomic import check_output_path

    if not cfg.save_at or out is None:
        return {}
    paths = {}
    for n in cfg.save_at:
        p = snapshot_path(out, n)
        if p.resolve() == Path(out).resolve():
            raise RcompError(f"--save-at {n} would write the output {out} itself (its name ends in -s{n}); name the "
                             "output after its own step count, or drop that snapshot")
        paths[n] = check_output_path(p, inputs, force=cfg.force)
    return paths


def steps_budget(cfg: Config, log=C.stderr_log) -> int | None:
    """The step budget: given, or the steps that cost --budget-fraction of --budget-of's training."""
    if cfg.budget_of is None:
        return cfg.steps_budget
    from rcomp.io.describe import describe
    from rcomp.train.budget import passes_per_step, steps_for_fraction

    attack_steps = cfg.steps if cfg.steps is not None else 10
    steps = steps_for_fraction(cfg.budget_fraction, describe(cfg.budget_of)["history"], cfg.adv, attack_steps,
                               reference=str(cfg.budget_of), grad_align=cfg.grad_align)
    per = passes_per_step(cfg.adv, attack_steps, cfg.grad_align)
    log(f"budget: {steps} steps x {per} passes = {cfg.budget_fraction:g} of {cfg.budget_of}'s training cost")
    return steps


def train_config(cfg: Config, opt_name: str, device: str, state_path: Path | None):
    from rcomp.train import AdvConfig, TrainConfig

    return TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt_name,
        lr=cfg.lr if cfg.lr is not None else DEFAULT_LR[opt_name], momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, warmup=cfg.warmup,
        adv=AdvConfig(cfg.adv, cfg.eps, cfg.alpha, cfg.steps, cfg.norm, cfg.beta, beta_warmup=cfg.beta_warmup,
                      random_start=cfg.random_start, noise=cfg.noise, grad_align=cfg.grad_align),
        augment=cfg.augment,
        val_split=cfg.val_split, seed=cfg.seed, device=device, save_every=cfg.save_every, state_path=state_path,
        max_steps=steps_budget(cfg), allow_collapse=cfg.allow_collapse, snapshot_at=cfg.save_at,
    ).validate()


def _state_path(cfg: Config, out: Path | None) -> Path | None:
    if not cfg.save_every:
        return None
    if out is None:
        raise RcompError("--save-every writes training states next to the output: give output=PATH")
    state = C.default_output(out, "state")
    if state.exists() and not cfg.force and (cfg.resume is None or state.resolve() != Path(cfg.resume).resolve()):
        raise RcompError(f"training state {state} already exists; pass --force, resume from it with "
                         f"--resume {state}, or choose another -o")
    return state


def _test_metrics(model, cfg: Config, tcfg, dist, dev, log) -> dict[str, Any]:
    from rcomp.data.registry import get_dataset
    from rcomp.data.subset import choose
    from rcomp.train.loop import evaluate_split

    test_ds = get_dataset(cfg.data, "test", model.meta.input, cfg.data_dir, seed=cfg.seed, log=log)
    idx, points = choose(test_ds, cfg.eval_n)
    if cfg.eval_attack == "auto" and cfg.adv != "none":
        res = _auto_figures(model, test_ds, idx, cfg, dev)
    else:
        res = evaluate_split(model, test_ds, idx, tcfg, cfg.eps if cfg.adv != "none" else None, 10_000, dist, dev)
    out = {f"test_{k}": round(v, 6) for k, v in res.items()}
    out["test_n"] = len(idx)
    out["test_points"] = points
    if cfg.adv != "none":
        out["test_attack"] = f"{cfg.eval_attack} (seed {cfg.seed})"
    return out


def _auto_figures(model, ds, idx: list[int], cfg: Config, dev: str) -> dict[str, float]:
    """Clean and robust accuracy under the auto cascade (the same figure ``rcomp attack --attack auto
    --seed S`` gives on these points: auto's random draws depend only on the seed and the image)."""
    from rcomp.evaluation.accuracy import batches
    from rcomp.evaluation.bench import build_attacks
    from rcomp.evaluation.robustness import evaluate

    attacks = build_attacks(["auto"], [cfg.eps], norm=cfg.norm, seed=cfg.seed)
    res = evaluate(model, batches(ds, idx, cfg.batch_size, dev), attacks, dev, progress=False)
    return {"clean_acc": res.clean_acc, "robust_acc": res.worst_case_acc}


def _steps_per_epoch(cfg: Config, n_images: int, dist) -> int:
    """Optimizer steps of an epoch, as the loop's sampler counts them (it keeps the last, smaller batch)."""
    n_train = n_images - (max(1, round(n_images * cfg.val_split)) if cfg.val_split else 0)
    full, rest = divmod(n_train, cfg.batch_size)
    return max(1, full + (1 if rest >= dist.world else 0))


def _check_snapshots(cfg: Config, tcfg, n_images: int, dist) -> None:
    """Before any training: every --save-at step comes before the run's last step."""
    total = tcfg.max_steps or cfg.epochs * _steps_per_epoch(cfg, n_images, dist)
    late = [n for n in cfg.save_at if n >= total]
    if late:
        raise RcompError(f"--save-at {late[0]}: the run takes {total} optimizer steps and its output is the model "
                         f"after all of them; give snapshot steps below {total}")


def _log_start(cfg: Config, tcfg, what: str, n_images: int, dist, log) -> None:
    a = tcfg.adv
    spe = _steps_per_epoch(cfg, n_images, dist)
    length = (f"for {tcfg.max_steps} optimizer steps (the budget: {-(-tcfg.max_steps // spe)} epoch(s) of {spe} "
              "steps)" if tcfg.max_steps else f"for {cfg.epochs} epochs")
    log(f"training {what} on {cfg.data} ({n_images} images) {length}, adv {cfg.adv}"
        + (f" eps {cfg.eps:.4g} {a.norm} steps {a.steps} alpha {a.alpha:.4g}" if cfg.adv != "none" else "")
        + f", {tcfg.optimizer} lr {tcfg.lr:g} {cfg.schedule}, batch {cfg.batch_size}"
        + (f" over {dist.world} processes" if dist.enabled else ""))


def _params(cfg: Config, tcfg, source, model, dist) -> dict[str, Any]:
    adv = cfg.adv != "none"
    return {"source": str(source) if source else None, "arch": model.meta.arch.name, "data": cfg.data,
            "epochs": cfg.epochs, "adv": cfg.adv, "eps": cfg.eps if adv else None,
            "alpha": tcfg.adv.alpha if adv else None, "steps": tcfg.adv.steps if adv else None, "norm": cfg.norm,
            "beta": cfg.beta if cfg.adv == "trades" else None,
            **({"beta_warmup": cfg.beta_warmup} if cfg.beta_warmup else {}),
            **({"random_start": False} if cfg.adv == "fgsm" and not cfg.random_start else {}),
            **({"noise": cfg.noise} if cfg.adv == "n-fgsm" else {}),
            **({"grad_align": cfg.grad_align} if cfg.grad_align else {}), "optimizer": tcfg.optimizer, "lr": tcfg.lr,
            "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "schedule": cfg.schedule,
            "warmup": cfg.warmup, "batch_size": cfg.batch_size, "augment": cfg.augment, "val_split": cfg.val_split,
            "n": cfg.n, "seed": cfg.seed, "processes": dist.world, "resumed": cfg.resume is not None,
            **({"eval_attack": cfg.eval_attack} if cfg.eval_attack != "pgd" else {}),
            **({"steps_budget": tcfg.max_steps} if tcfg.max_steps else {}),
            **({"budget_of": str(cfg.budget_of), "budget_fraction": cfg.budget_fraction} if cfg.budget_of else {})}


def _cost_keys() -> tuple[str, ...]:
    """What the history records of a run's cost; wall time is left out of reproducible builds
    (SOURCE_DATE_EPOCH set), where the same seed must give the same bytes."""
    return ("steps",) if os.environ.get("SOURCE_DATE_EPOCH") else ("steps", "wall_seconds")


def apply(model, cfg: Config, *, source: Path | None = None, dist=None, dev: str = "cpu",
          state_path: Path | None = None, log=C.stderr_log, from_scratch: bool | None = None,
          copy: bool = True) -> C.StageResult:
    """A trained copy of ``model`` (which is left unchanged; ``copy=False`` trains ``model`` itself, for a
    caller that owns it) on ``cfg.data``, with the history entry recorded on it (rank 0 under torchrun).

    ``from_scratch`` picks the optimizer default (adam for a new model, sgd for fine-tuning); by
    default a model with no source checkpoint and an ``arch`` is a new one."""
    from rcomp.data.registry import check_fits, get_dataset
    from rcomp.train import distributed as D
    from rcomp.train.loop import check_resume
    from rcomp.train.loop import finetune as train

    dist = dist or D.DistInfo()
    if from_scratch is None:
        from_scratch = source is None and cfg.arch is not None
    where = str(source) if source is not None else "the model"
    cfg = dataclasses.replace(cfg, data=C.resolve_data(cfg.data, model.meta.dataset, where, cfg.data_dir, log))
    if copy:
        model = C.copy_model(model)
    if model.meta.dataset and model.meta.dataset != cfg.data:
        log(f"note: {where} records dataset {model.meta.dataset}; training on {cfg.data}, which the output records")
    opt_name = cfg.optimizer or ("adam" if from_scratch else "sgd")
    train_ds = get_dataset(cfg.data, "train", model.meta.input, cfg.data_dir, seed=cfg.seed, log=log)
    check_fits(train_ds, model.meta.num_classes, cfg.data)
    train_points = None
    if cfg.n is not None:
        from rcomp.data.registry import subset
        from rcomp.data.subset import points_text

        train_ds, train_points = subset(train_ds, cfg.n)
    tcfg = train_config(cfg, opt_name, dev, state_path)
    _check_snapshots(cfg, tcfg, len(train_ds), dist)
    if cfg.resume is not None:
        check_resume(cfg.resume, tcfg)
    if dist.is_main:
        if train_points:
            log(f"training on {points_text(train_points)}")
        what = f"{cfg.arch} from scratch" if from_scratch else f"{where} ({model.meta.arch.name})"
        _log_start(cfg, tcfg, what, len(train_ds), dist, log)
    model, metrics = train(model, train_ds, tcfg, dataset=cfg.data, resume=cfg.resume, dist=dist)
    test = _test_metrics(model, cfg, tcfg, dist, dev, log) if cfg.eval_n else {}
    model.meta.dataset = cfg.data
    cost = {k: metrics[k] for k in _cost_keys() if k in metrics}
    if "overfit_guard" in metrics:
        cost["overfit_guard"] = metrics["overfit_guard"]
    params = _params(cfg, tcfg, source, model, dist)
    source_sha = getattr(model, "source_sha256", None) if source else None
    snapshots = {}
    for n, (snap, info) in sorted((metrics.get("snapshots") or {}).items()):
        snap.meta.dataset = cfg.data
        snap_test = _test_metrics(snap, cfg, tcfg, dist, dev, log) if cfg.eval_n else {}
        snap_cost = {"steps": n, **({"wall_seconds": info["wall_seconds"]} if "wall_seconds" in cost else {})}
        C.record(snap, "finetune", {**params, "snapshot": {"steps": n, "of_steps": metrics["steps"]}}, source_sha,
                 {"epochs": info["epochs"], **snap_cost, **snap_test,
                  **({"train_points": train_points} if train_points else {})})
        snapshots[n] = C.derived(snap)
    entry = C.record(model, "finetune", params, source_sha,
                   {"epochs": metrics["epochs"], **cost, **test,
                    **({"train_points": train_points} if train_points else {})})
    return C.StageResult(model=C.derived(model), entry=entry, snapshots=snapshots,
                         report={"epochs": metrics["epochs"], **cost, **test})


def run(cfg: Config, inputs: list, *, log=C.stderr_log, default_output: bool = True, dist=None,
        **_: Any) -> C.StageResult:
    """Build or load -> train -> record -> save (rank 0 only under torchrun). ``inputs`` is empty (train
    ``--arch`` from scratch) or holds a checkpoint path or a loaded model (left as it was); without
    ``cfg.output`` the output gets a default name, or (``default_output=False``, the Python API)
    nothing is written. ``dist``: the caller owns the process group (a recipe under torchrun passes
    ``DistInfo()``: train in this process alone)."""
    from rcomp.train import distributed as D

    with D.process_group(dist, C.resolve_device(cfg.device)) as (dist, dev):
        C.seed_everything(cfg.seed)
        source, given = C.split_input(inputs[0]) if inputs else (None, None)
        scratch = source is None and given is None
        if scratch and not cfg.arch:
            raise RcompError("give a checkpoint to fine-tune, or --arch NAME to train from scratch")
        if scratch:
            model = build(cfg, log)
        else:
            if cfg.input_shape or cfg.num_classes or cfg.arch_kwargs:
                raise RcompError("--num-classes, --input-shape and --arch-kwargs only apply with --arch and no CKPT")
            model = given if given is not None else C.as_model(source, "cpu", cfg.arch, cfg.trust_factory)
        out = C.plan_output(_default_output(cfg, source) if default_output else cfg.output, source,
                            "ft" if cfg.adv == "none" else f"ft-{cfg.adv}", cfg.force, model=given,
                            default=default_output)
        snap_paths = _snapshot_paths(cfg, out, C.input_files(source, given))
        res = apply(model, cfg, source=source, dist=dist, dev=dev, state_path=_state_path(cfg, out), log=log,
                    from_scratch=scratch, copy=given is not None)
        if not dist.is_main:
            return res
        res.model.cpu()
        written = []
        for n, path in snap_paths.items():  # the snapshots first: a finished output has all of them beside it
            sha = C.save_output(res.snapshots[n].cpu(), path, cfg.force, C.input_files(source, given))
            written.append({"steps": n, "path": str(path), "sha256": sha})
            log(f"wrote {path} (the model after {n} of {res.report.get('steps', '?')} steps, sha256 {sha[:12]})")
        C.publish(res, out, cfg.force, C.input_files(source, given))
        if written:
            res.report["snapshots"] = written
        if out is not None:
            log(f"wrote {out} ({C.parameters(res.model):,} parameters, sha256 {res.sha256[:12]})")
        return res
