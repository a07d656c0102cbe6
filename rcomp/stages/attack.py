"""The attack stage: attack a checkpoint on a dataset and report robustness, optionally saving the
examples; or replay saved examples against another checkpoint (transfer evaluation)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcomp import options as O
from rcomp.attacks.catalog import ATTACKS, LOSSES, NORMS
from rcomp.errors import RcompError
from rcomp.stages import common as C


def _takers(option: str) -> str:
    """' Taken by pgd, cw.' from the catalogue: which built-in attacks take ``option``."""
    names = [e.name for e in ATTACKS.entries(plugins=False) if option in e.takes]
    return f" Taken by {', '.join(names)}." if names else ""


SUMMARY = "Attack a checkpoint and report clean accuracy, robust accuracy, success rate, perturbation norms, speed."
DOC = """eps is in pixel units of [0, 1] images (normalisation is inside the model); adversarial images
are clipped to [0, 1]; a point counts as robust only if it is correct clean and under every
attack; points wrong clean are not attacked. Attack gradients come from the model itself, or
from its differentiable twin for an int8 model (the report says which). The report goes to
stdout (--json for JSON), progress to stderr.

Attacks: """ + "; ".join(f"{e.name} ({e.paper}; {e.help})" for e in ATTACKS.entries(plugins=False)) + \
    f". Installed plugins add more: {ATTACKS.listing}."
EXAMPLES = """rcomp attack model.safetensors --data digits --attack pgd --eps 0.1
rcomp attack model.safetensors --data cifar10 -n 1000 --attack auto --eps 8/255
rcomp attack model.safetensors --data cifar10 --attack pgd --eps 2/255,4/255,8/255 --json
rcomp attack model.safetensors --data digits --attack pgd --eps 0.1 -o adv.safetensors
rcomp attack pruned.safetensors --from adv.safetensors"""


@dataclass
class AttackOptions:
    """The attack options ``attack`` and ``bench`` share."""

    attack: tuple[str, ...] | None = O.opt(None, "--attack", kind="names", choices=ATTACKS.choices(),
                                         help=f"Attack(s), comma-separated: {ATTACKS.help_names()}.")
    eps: tuple[float, ...] | None = O.opt(None, "--eps", kind="eps_list",
                                      help="Budget(s) in pixel units of [0, 1] images: 8/255, 0.03, or a comma list "
                                           "to sweep, e.g. 2/255,8/255.")
    norm: str = O.opt("linf", "--norm", kind="choice", choices=NORMS, help=" or ".join(NORMS) + ".")
    steps: int | None = O.opt(None, "--steps", kind="int", min=1, max=10000,
                            help="Iterations (default: pgd 10, cw 30, apgd 100; fgsm has one)." + _takers("steps"))
    alpha: float | None = O.opt(None, "--alpha", kind="number", min=0, min_open=True, max=1,
                              help="Step size for pgd/cw (default 2.5 * eps / steps) or fgsm with a random start "
                                   "(1.25 * eps)." + _takers("alpha"))
    random_start: bool | None = O.opt(None, "--random-start", kind="bool", secondary="--no-random-start",
                                    help="Start from a random point of the ball (default: on for pgd, cw, apgd; off "
                                         "for fgsm)." + _takers("random_start"))
    restarts: int | None = O.opt(None, "--restarts", kind="int", min=1, max=100,
                               help="Random restarts; later ones attack only the points not yet fooled (default 1; "
                                    "auto: 1, or 3 when the model's gradients are a surrogate, as for quantized "
                                    "models)." + _takers("restarts"))
    loss: str | None = O.opt(None, "--loss", kind="choice", choices=LOSSES,
                           help="Loss to maximise: ce, dlr (difference of logits ratio) or cw (margin); default ce "
                                "(cw for cw)." + _takers("loss"))
    targeted: bool = O.opt(False, "--targeted", kind="bool",
                         help="Push each image towards a random other class (drawn with --seed) instead of away from "
                              "its label." + _takers("targeted"))
    queries: int | None = O.opt(None, "--queries", kind="int", min=1, max=10**6,
                                help="Square's query budget per point (default: 5000 for square, the reference; "
                                     "1000 inside auto, where it measured the same figures at half the time)." + _takers("queries"))
    targets: int | None = O.opt(None, "--targets", kind="int", min=1, max=1000,
                                help="Target classes APGD-T tries, nearest by logit margin first (default: 9 for "
                                     "apgd-t, the reference; 4 inside auto, where the farther ones found nothing more; "
                                     "at most classes - 1)." + _takers("targets"))
    cascade: bool = O.opt(False, "--cascade", kind="bool",
                        help="Run the listed attacks as a cascade: each attacks only the points still robust after "
                             "the ones before it (cheaper; per-attack figures are then not independent).")
    surrogate: Path | None = O.opt(None, "--surrogate", kind="path", model_ok=True,
                                   help="For .onnx models (no gradients): the checkpoint gradient attacks run on, their "
                                        "examples scored on the ONNX model (default: the source checkpoint the file "
                                        "records, if it is at its recorded path with its recorded sha256).")
    records: Path | None = O.opt(None, "--records", kind="path",
                                 help="Keep per-example records in this folder, one file per batch as it is done, so "
                                      "an interrupted evaluation can continue with --resume.")
    resume: bool = O.opt(False, "--resume", kind="bool",
                         help="Continue the evaluation whose records are in --records (same model, data, attacks "
                              "and seed); ends with the figures of an uninterrupted run.")

    def check_attacks(self) -> None:
        if self.attack and not self.eps:
            raise RcompError("give --eps in pixel units, e.g. --eps 8/255 or --eps 0.1")
        if self.resume and self.records is None:
            raise RcompError("--resume continues the evaluation kept in --records DIR; give --records")

    def build(self, seed: int) -> dict[str, Any]:
        """``{key: attack}`` for every attack and eps."""
        from rcomp.evaluation.bench import build_attacks

        return build_attacks(list(self.attack), list(self.eps), norm=self.norm, steps=self.steps, alpha=self.alpha,
                             random_start=self.random_start, restarts=self.restarts, loss=self.loss,
                             targeted=self.targeted, seed=seed, lenient=len(self.attack) > 1,
                             **{k: v for k, v in (("queries", self.queries), ("targets", self.targets)) if v is not None})


@dataclass
class Config(AttackOptions):
    data: str | None = O.data_opt(help=C.RECORDED_DATA_HELP)
    split: str = O.opt("test", "--split", kind="choice", choices=("train", "test"), help="train or test.")
    n: int | None = O.n_opt()
    from_file: Path | None = O.opt(None, "--from", kind="path",
                                 help="Replay adversarial examples saved with -o against CKPT (transfer evaluation) "
                                      "instead of attacking.")
    output: Path | None = O.opt(None, "-o", "--output", kind="path",
                              help="Save the examples (safetensors: images, adv_images, labels, with the attack's "
                                   "parameters); one attack and one eps only.")
    batch_size: int = O.batch_opt(128)
    seed: int = O.seed_opt()
    device: str = O.device_opt("auto")
    data_dir: Path | None = O.data_dir_opt()
    arch: str | None = C.arch_opt()
    trust_factory: bool = O.trust_opt()
    force: bool = O.force_opt()
    json: bool = O.json_opt()

    def check(self) -> None:
        if self.from_file is not None:
            if self.output is not None:
                raise RcompError("--from replays saved examples; it writes none, so drop -o")
            return
        C.check_data(self.data, self.data_dir)
        if not self.attack:
            raise RcompError(f"give --attack, e.g. --attack pgd (choose from {ATTACKS.help_names()})")
        self.check_attacks()
        if self.output is not None and len(self.eps) != 1:
            raise RcompError(f"-o saves the examples of one eps per file, and --eps gives {len(self.eps)}; "
                             "give a single --eps (one run per eps)")


def report_dict(model, path: Path, res, data: str | None, split: str | None, device: str,
                output: Path | None = None, source: dict | None = None, points: dict | None = None
                ) -> dict[str, Any]:
    """The attack report as JSON-able data (what ``--json`` prints)."""
    return {
        "path": str(path), "sha256": model.source_sha256, "arch": model.meta.arch.name,
        "gradient_source": res.gradient_source, "data": data, "split": split, "n": res.n, "device": device,
        "clean_acc": res.clean_acc, "robust_acc": dict(res.robust_acc), "worst_case_acc": res.worst_case_acc,
        "mode": getattr(res, "mode", "independent"), "seed": getattr(res, "seed", None),
        "stage_robust_acc": dict(getattr(res, "stage_robust_acc", {}) or {}),
        "gradient_masking_suspected": getattr(res, "gradient_masking_suspected", None),
        "checks": getattr(res, "checks", None),
        "attacks": {k: {"params": a.params, "robust_acc": a.robust_acc, "success_rate": a.success_rate,
                        "mean_norm": a.mean_norm, "max_norm": a.max_norm, "attacked": a.attacked,
                        "seconds": round(a.seconds, 4), "examples_per_s": round(a.examples_per_s, 2)}
                    for k, a in res.attacks.items()},
        "seconds": round(res.seconds, 4), "examples_per_s": round(res.examples_per_s, 2),
        "output": str(output) if output is not None else None, "source": source, "points": points,
    }


def saved_attack_params(attacks: dict) -> dict[str, Any]:
    """The parameters an examples file records: one attack's own, or for several (a suite, a cascade,
    a list) the shared eps/norm/seed/mode and every stage's parameters, in order."""
    if len(attacks) == 1:
        (atk,) = attacks.values()
        return atk.params()
    from rcomp.evaluation.cascade import wants_cascade

    params = {k: a.params() for k, a in attacks.items()}
    suites = {getattr(a, "suite", None) for a in attacks.values()}
    name = suites.pop() if len(suites) == 1 and None not in suites else "+".join(attacks)

    def shared(field):
        vals = {repr(p.get(field)) for p in params.values()}
        return next(iter(params.values())).get(field) if len(vals) == 1 else None

    return {"attack": name, "eps": shared("eps"), "norm": shared("norm"), "seed": shared("seed"),
            "mode": "cascade" if wants_cascade(attacks, False) else "per-example worst case",
            "stages": params}


def _save(cfg: Config, path: Path, model, res, attacks) -> None:
    import torch

    from rcomp.io.examples import save_examples

    rec = res.records
    info = {"attack": saved_attack_params(attacks), "stages": list(rec.stages), "mode": res.mode,
            "source_checkpoint": next((str(p) for p in C.input_files(path, model)), None),
            "source_sha256": model.source_sha256,
            "arch": model.meta.arch.name, "gradient_source": model.gradient_source, "data": cfg.data,
            "split": cfg.split, "n": res.n, "input_shape": list(model.meta.input.shape), "clean_acc": res.clean_acc,
            "robust_acc": res.worst_case_acc, "stage_robust_acc": dict(res.stage_robust_acc)}
    save_examples(Path(cfg.output), rec.clean, rec.adv, rec.label, info, C.input_files(path, model), cfg.force,
                  extra={"index": rec.index, "stage": rec.stage, "clean_correct": rec.clean_correct.to(torch.uint8)})


def records_info(model, path: Path | None, cfg, attacks: dict, device: str, n: int) -> dict[str, Any]:
    """What ``--records`` belong to: the digest of a records folder is made from this."""
    from rcomp.evaluation.cascade import expand_suites, wants_cascade

    sha = getattr(model, "source_sha256", None)
    if sha is None and path is not None:
        from rcomp.io.header import sha256_file

        sha = sha256_file(path)
    return {"model_sha256": sha, "data": cfg.data, "split": cfg.split, "n": n, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "mode": "cascade" if wants_cascade(attacks, cfg.cascade) else "independent",
            "attacks": {k: a.params() for k, a in expand_suites(attacks).items()},
            "device_type": str(device).split(":")[0]}


def open_records(cfg, model, path: Path | None, attacks: dict, device: str, n: int, log, folder: Path | None = None,
                 dist=None):
    """The :class:`~rcomp.evaluation.records.RecordDir` of ``--records`` (None without it); under
    torchrun rank 0 makes the folder before the other processes open it."""
    if cfg.records is None:
        return None
    from rcomp.evaluation.records import RecordDir
    from rcomp.train.distributed import barrier

    info = records_info(model, path, cfg, attacks, device, n)
    if dist is not None and dist.enabled:
        if dist.is_main:
            RecordDir(Path(folder or cfg.records), info, cfg.resume)
        barrier(dist)
        store = RecordDir(Path(folder or cfg.records), info, True)
        barrier(dist)  # every process has looked at the folder before any writes a chunk
    else:
        store = RecordDir(Path(folder or cfg.records), info, cfg.resume)
    have = len(store.chunks()) if cfg.resume else 0
    if have:  # a fresh folder (a recipe's split stage is one: its records are made --resume) says nothing
        log(f"resuming from {store.path}: {have} batch(es) of {cfg.batch_size} already done")
    return store


def apply(model, cfg: Config, log=C.stderr_log, path: Path | None = None, attacks: dict | None = None,
          dist=None) -> C.StageResult:
    """Attack ``model`` (loaded) on ``cfg.data``; the report is in the result. ``path`` names it;
    ``attacks`` are ``cfg.build(cfg.seed)`` when the caller built them already; ``dist`` (under
    torchrun) splits the batches over the processes, which share their records."""
    from rcomp.attacks.auto import surrogate_note
    from rcomp.data.registry import check_fits, get_dataset, make_loader
    from rcomp.data.subset import points_text
    from rcomp.evaluation.robustness import evaluate
    from rcomp.models.wrapper import on_device

    quiet = dist is not None and dist.enabled and not dist.is_main  # torchrun: rank 0 alone says the data
    cfg = dataclasses.replace(cfg, data=C.resolve_data(cfg.data, model.meta.dataset,
                                                       str(path) if path is not None else "the model", cfg.data_dir,
                                                       _quiet if quiet else log))
    C.seed_everything(cfg.seed)
    attacks = attacks if attacks is not None else cfg.build(cfg.seed)
    dev = C.resolve_device(cfg.device)
    model = on_device(model, dev)  # a caller's model stays where it was
    name = path.name if path is not None else "model"
    ds = get_dataset(cfg.data, cfg.split, model.meta.input, cfg.data_dir, log=log)
    check_fits(ds, model.meta.num_classes, cfg.data)
    loader = make_loader(ds, cfg.batch_size, n=cfg.n)
    store = open_records(cfg, model, path, attacks, dev, min(cfg.n or len(ds), len(ds)), log, dist=dist)
    sharded = dist is not None and dist.enabled
    if sharded and not dist.is_main:
        log = _quiet
    log(f"attacking {name} ({model.meta.arch.name}, gradients: {model.gradient_source}) on {cfg.data} "
        f"{cfg.split}, {points_text(loader.points)}, device {dev}, seed {cfg.seed}")
    note = surrogate_note(attacks, model.gradient_source)
    if note:
        log(note)
    saving = cfg.output is not None
    res = evaluate(model, loader, attacks, device=dev, progress=not sharded or dist.is_main, desc="attack",
                   cascade=cfg.cascade, records="images" if saving else False, store=store,
                   shard=(dist.rank, dist.world) if sharded else None)
    if sharded and not dist.is_main:
        out = C.StageResult(model=model, report={})
        out.silent = True  # type: ignore[attr-defined]
        return out
    if sharded:
        log(f"{dist.world} processes shared the {res.n} points (records in {cfg.records})")
    for line in (res.checks or {}).get("warnings", []):
        log(f"warning: {line}")
    if saving:
        _save(cfg, path, model, res, attacks)
        log(f"wrote {res.n} adversarial examples to {cfg.output}")
    report = report_dict(model, path or Path(name), res, cfg.data, cfg.split, dev, output=cfg.output,
                         points=loader.points)
    return C.StageResult(model=model, output=cfg.output, report=report)


def _quiet(msg: str) -> None:
    """The log of a torchrun process other than rank 0."""


def run(cfg: Config, inputs: list, *, log=C.stderr_log, dist=None, **_: Any) -> C.StageResult:
    """Attack (or replay) the checkpoint (a path, or a loaded model: the Python API) and return the
    report; writes only the examples file of -o.
    Under torchrun (``torchrun --nproc-per-node N -m rcomp attack ... --records DIR``) the processes
    split the batches; rank 0 reports. ``dist`` (a :class:`~rcomp.train.distributed.DistInfo`): the
    caller owns the process group (a recipe under torchrun); ``DistInfo()`` runs in this process alone."""
    from rcomp.io.atomic import check_output_path
    from rcomp.train import distributed as D

    path, given = C.split_input(inputs[0], onnx=True)
    if cfg.from_file is not None:
        return _replay(cfg, path, given)
    attacks = cfg.build(cfg.seed)  # refuse bad attack settings before loading anything
    C.require_records(cfg, dist)
    if cfg.output is not None and (dist is None or dist.is_main):
        check_output_path(Path(cfg.output), C.input_files(path, given), force=cfg.force)
    with D.process_group(dist, C.resolve_device(cfg.device)) as (dist, dev):
        model = given if given is not None else C.as_model(path, dev, cfg.arch, cfg.trust_factory, cfg.surrogate)
        C.check_gradients(model, attacks, path.name if path is not None else "the model", log)
        cfg_dev = cfg if dev == C.resolve_device(cfg.device) else _with_device(cfg, dev)
        return apply(model, cfg_dev, log, path, attacks, dist=dist if dist.enabled else None)


def _with_device(cfg: Config, dev: str) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, device=dev)


def _replay(cfg: Config, path: Path | None, model=None) -> C.StageResult:
    """Replay the examples of ``cfg.from_file`` against the checkpoint ``path`` (or ``model``, loaded)."""
    from rcomp.evaluation.robustness import replay as replay_pairs
    from rcomp.io.examples import load_examples_with_points

    src = Path(cfg.from_file)
    if not src.exists():
        raise RcompError(f"--from {src} does not exist; check the path")
    x, xa, y, info, saved = load_examples_with_points(src)
    dev = C.resolve_device(cfg.device)
    model = C.as_model(model if model is not None else path, dev, cfg.arch, cfg.trust_factory)
    path = Path(path) if path is not None else Path("model")
    want = tuple(model.meta.input.shape)
    if tuple(x.shape[1:]) != want:
        raise RcompError(f"--from {src} holds {'x'.join(map(str, x.shape[1:]))} images but {path.name} takes "
                         f"{'x'.join(map(str, want))}; replay examples made for this input shape")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= model.meta.num_classes):
        raise RcompError(f"--from {src} has labels up to {int(y.max())} but {path.name} outputs "
                         f"{model.meta.num_classes} classes; replay examples made for this task")
    from rcomp.data.subset import choose

    idx, points = choose(_Labels(y, model.meta.num_classes), cfg.n)
    if len(idx) < len(y):
        x, xa, y = x[idx], xa[idx], y[idx]
        saved = {k: v[idx] for k, v in saved.items()}
    params = info.get("attack", {}) if isinstance(info.get("attack"), dict) else {}
    name = f"{params.get('attack', 'saved')} (transfer)"
    from rcomp.attacks.catalog import NORMS

    res = replay_pairs(model, x, xa, y, batch_size=cfg.batch_size, device=dev, name=name,
                       norm=params.get("norm") if params.get("norm") in NORMS else NORMS[0],
                       records="stage" in saved)
    res.attacks[name].params = {**params, "transfer_from": info.get("source_checkpoint"),
                                "transfer_from_sha256": info.get("source_sha256")}
    source = {"path": str(src), "source_checkpoint": info.get("source_checkpoint"),
              "source_sha256": info.get("source_sha256"), "data": info.get("data"), "split": info.get("split")}
    if "stage" in saved and "clean_correct" in saved and res.records is not None:
        # the points the file says were robust, against those the replay finds robust
        saved_robust = (saved["clean_correct"] != 0) & (saved["stage"] < 0)
        differ = int((saved_robust != res.records.robust).sum())
        source["points_differing_from_record"] = differ
        if differ and info.get("source_sha256") == model.source_sha256:
            C.stderr_log(f"warning: replayed on the model that made them, {differ} point(s) of {src} changed "
                         "outcome (a model whose outputs vary between passes?)")
    return C.StageResult(model=model, report=report_dict(model, path, res, None, None, dev, source=source,
                                                         points=points))


class _Labels:
    """Saved examples' labels seen as a dataset, so -n picks them by the one subset rule."""

    def __init__(self, labels, num_classes: int):
        self.labels, self.num_classes = labels, num_classes

    def __len__(self) -> int:
        return len(self.labels)
