"""``rcomp attack``: attack a checkpoint on a dataset, report robustness, optionally save the examples;
or replay saved examples against another checkpoint (transfer evaluation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rcomp.cli.common import (
    ArchOpt,
    CkptArg,
    ConfigOpt,
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    OptionalDataOpt,
    SeedOpt,
    emit_json,
    input_checkpoint,
    log,
    parse_eps_list,
    parse_number,
)
from rcomp.errors import RcompError

ADV_KIND = "adversarial-examples"

# ----- options shared with `rcomp bench` ------------------------------------
AttackOpt = Annotated[str | None, typer.Option(
    "--attack", help="Attack(s), comma-separated: fgsm (one step), pgd (steps 10), apgd (steps 100, --loss ce|dlr), "
                     "cw (PGD on the Carlini-Wagner margin, steps 30).", show_default=False)]
EpsOpt = Annotated[str | None, typer.Option(
    "--eps", help="Budget(s) in pixel units of [0, 1] images: 8/255, 0.03, or a comma list to sweep, e.g. "
                  "2/255,8/255.", show_default=False)]
NormOpt = Annotated[str, typer.Option("--norm", help="linf or l2.")]
StepsOpt = Annotated[int | None, typer.Option(
    "--steps", help="Iterations (default: pgd 10, cw 30, apgd 100; fgsm has one).", show_default=False)]
AlphaOpt = Annotated[str | None, typer.Option(
    "--alpha", help="Step size for pgd/cw (default 2.5 * eps / steps) or fgsm with a random start (1.25 * eps).",
    show_default=False)]
RandomStartOpt = Annotated[bool | None, typer.Option(
    "--random-start/--no-random-start", help="Start from a random point of the ball (default: on for pgd, cw, "
                                             "apgd; off for fgsm).", show_default=False)]
RestartsOpt = Annotated[int, typer.Option("--restarts", help="Random restarts; later ones attack only the points "
                                                             "not yet fooled.")]
LossOpt = Annotated[str | None, typer.Option(
    "--loss", help="Loss to maximise: ce, dlr (difference of logits ratio) or cw (margin); default ce (cw for cw).",
    show_default=False)]
TargetedOpt = Annotated[bool, typer.Option(
    "--targeted", help="Push each image towards a random other class (drawn with --seed) instead of away from "
                       "its label.")]
SplitOpt = Annotated[str, typer.Option("--split", help="train or test.")]
NOpt = Annotated[int | None, typer.Option("-n", "--n", help="Evaluate the first N points (default: all).",
                                          show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Points per batch.")]


def attack_settings(attack_names: str | None, eps: str | None, norm: str, steps: int | None, alpha: str | None,
                    random_start: bool | None, restarts: int, loss: str | None, targeted: bool, seed: int
                    ) -> dict[str, Any]:
    """Validate the attack options (one-line errors) and build ``{key: attack}``."""
    from rcomp.evaluation.bench import build_attacks

    if not attack_names or not attack_names.strip():
        raise RcompError("give --attack, e.g. --attack pgd (choose from fgsm, pgd, apgd, cw)")
    names = [a.strip().lower() for a in attack_names.split(",") if a.strip()]
    if not eps:
        raise RcompError("give --eps in pixel units, e.g. --eps 8/255 or --eps 0.1")
    parse_eps_list(eps)
    eps_texts = [e.strip() for e in eps.split(",") if e.strip()]
    alpha_v = parse_number(alpha, "--alpha") if alpha is not None else None
    if alpha_v is not None and alpha_v <= 0:
        raise RcompError(f"--alpha must be positive, got {alpha}")
    if steps is not None and steps < 1:
        raise RcompError(f"--steps must be at least 1, got {steps}")
    return build_attacks(names, eps_texts, norm=norm.strip().lower(), steps=steps, alpha=alpha_v,
                         random_start=random_start, restarts=restarts, loss=loss, targeted=targeted, seed=seed,
                         lenient=len(names) > 1)


# ----- the report -----------------------------------------------------------

def report_dict(model, path: Path, res, data: str | None, split: str | None, device: str,
                output: Path | None = None, source: dict | None = None) -> dict[str, Any]:
    return {
        "path": str(path),
        "sha256": model.source_sha256,
        "arch": model.meta.arch.name,
        "gradient_source": res.gradient_source,
        "data": data,
        "split": split,
        "n": res.n,
        "device": device,
        "clean_acc": res.clean_acc,
        "robust_acc": dict(res.robust_acc),
        "worst_case_acc": res.worst_case_acc,
        "attacks": {k: {"params": a.params, "robust_acc": a.robust_acc, "success_rate": a.success_rate,
                        "mean_norm": a.mean_norm, "max_norm": a.max_norm, "attacked": a.attacked,
                        "seconds": round(a.seconds, 4), "examples_per_s": round(a.examples_per_s, 2)}
                    for k, a in res.attacks.items()},
        "seconds": round(res.seconds, 4),
        "examples_per_s": round(res.examples_per_s, 2),
        "output": str(output) if output is not None else None,
        "source": source,
    }


def print_report(d: dict[str, Any]) -> None:
    from tabulate import tabulate

    where = f"{d['data']} {d['split']}" if d["data"] else f"examples from {d['source']['path']}"
    print(f"model: {d['path']} ({d['arch']}; attack gradients: {d['gradient_source']})")
    print(f"data: {where}, n={d['n']}, device {d['device']}")
    print(f"clean accuracy: {d['clean_acc']:.4f}\n")
    rows = []
    for key, a in d["attacks"].items():
        p = a["params"]
        eps = p.get("eps")
        rows.append((key, p.get("norm", "-"), f"{eps:.5g}" if isinstance(eps, float) else (eps or "-"),
                     p.get("steps", "-"), f"{a['robust_acc']:.4f}", f"{a['success_rate']:.4f}",
                     f"{a['mean_norm']:.4g}", f"{a['max_norm']:.4g}", f"{a['examples_per_s']:.1f}"))
    print(tabulate(rows, headers=["attack", "norm", "eps", "steps", "robust acc", "success rate", "mean norm",
                                  "max norm", "examples/s"], tablefmt="simple"))
    if len(d["attacks"]) > 1:
        print(f"\nworst case over all attacks: {d['worst_case_acc']:.4f}")


# ----- saved examples -------------------------------------------------------

def save_examples(out: Path, images, adv, labels, info: dict[str, Any], inputs: tuple, force: bool) -> None:
    from rcomp.io.atomic import atomic_write_bytes, check_output_path
    from rcomp.io.serialize import serialize

    check_output_path(out, inputs, force=force)
    # rcomp's own writer: sorted keys, so the same examples give the same bytes
    data = serialize({"images": images, "adv_images": adv, "labels": labels},
                     {"rcomp.kind": ADV_KIND, "rcomp.adversarial": json.dumps(info, sort_keys=True)})
    atomic_write_bytes(out, data)


def load_examples(path: Path):
    """(images, adv_images, labels, info) from a file written by ``rcomp attack -o``."""
    from rcomp.io.checkpoint import load_tensors
    from rcomp.io.header import read_header

    header = read_header(path)
    if header.metadata.get("rcomp.kind") != ADV_KIND:
        raise RcompError(f"--from {path} is not a file of adversarial examples; make one with rcomp attack ... -o FILE")
    try:
        info = json.loads(header.metadata.get("rcomp.adversarial", "{}"))
    except json.JSONDecodeError:
        raise RcompError(f"--from {path} has malformed metadata rcomp.adversarial") from None
    t = load_tensors(path)
    for k in ("images", "adv_images", "labels"):
        if k not in t:
            raise RcompError(f"--from {path} lacks the tensor {k!r}; re-create it with rcomp attack -o")
    x, xa, y = t["images"], t["adv_images"], t["labels"]
    if x.shape != xa.shape or x.dim() != 4 or y.dim() != 1 or len(y) != len(x):
        raise RcompError(f"--from {path}: images {tuple(x.shape)}, adv_images {tuple(xa.shape)} and labels "
                         f"{tuple(y.shape)} do not match")
    return x, xa, y, info if isinstance(info, dict) else {}


def attack(
    ckpt: CkptArg = None,
    data: OptionalDataOpt = None,
    split: SplitOpt = "test",
    n: NOpt = None,
    attack_name: AttackOpt = None,
    eps: EpsOpt = None,
    norm: NormOpt = "linf",
    steps: StepsOpt = None,
    alpha: AlphaOpt = None,
    random_start: RandomStartOpt = None,
    restarts: RestartsOpt = 1,
    loss: LossOpt = None,
    targeted: TargetedOpt = False,
    from_file: Annotated[Path | None, typer.Option(
        "--from", help="Replay adversarial examples saved with -o against CKPT (transfer evaluation) instead of "
                       "attacking.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Save the examples (safetensors: images, adv_images, labels, with the attack's "
                               "parameters); one attack and one eps only.", show_default=False)] = None,
    batch_size: BatchOpt = 128,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    arch: ArchOpt = None,
    trust_factory: Annotated[bool, typer.Option("--trust-factory", help="Import the user factory a checkpoint "
                                                                        "names (only for files you trust).")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Attack a checkpoint and report clean accuracy, robust accuracy, success rate, perturbation norms, speed.

    eps is in pixel units of [0, 1] images (normalisation is inside the model); adversarial images
    are clipped to [0, 1]; a point counts as robust only if it is correct clean and under every
    attack; points wrong clean are not attacked. Attack gradients come from the model itself, or
    from its differentiable twin for an int8 model (the report says which). The report goes to
    stdout (--json for JSON), progress to stderr.

    Attacks: fgsm (Goodfellow et al. 2015); pgd (Madry et al. 2018; steps 10, alpha 2.5*eps/steps,
    random start, restarts 1); apgd (Croce and Hein 2020, the core of AutoAttack; steps 100,
    --loss ce or dlr); cw (PGD on the Carlini-Wagner margin loss; steps 30).

    Examples:

    \b
      rcomp attack model.safetensors --data digits --attack pgd --eps 0.1
      rcomp attack model.safetensors --data cifar10 -n 1000 --attack apgd --loss dlr --eps 8/255
      rcomp attack model.safetensors --data cifar10 --attack pgd --eps 2/255,4/255,8/255 --json
      rcomp attack model.safetensors --data digits --attack pgd --eps 0.1 -o adv.safetensors
      rcomp attack pruned.safetensors --from adv.safetensors
    """
    from rcomp.cli.common import resolve_device, seed_everything

    if batch_size < 1:
        raise RcompError(f"--batch-size must be at least 1, got {batch_size}")
    if n is not None and n < 1:
        raise RcompError(f"-n must be at least 1, got {n}")
    path = input_checkpoint(ckpt)
    if from_file is not None:
        if output is not None:
            raise RcompError("--from replays saved examples; it writes none, so drop -o")
        return _replay(path, Path(from_file), batch_size, n, device, arch, trust_factory, json_out)
    if not data:
        raise RcompError("give --data (e.g. --data digits), or --from FILE to replay saved examples")
    seed_everything(seed)
    attacks = attack_settings(attack_name, eps, norm, steps, alpha, random_start, restarts, loss, targeted, seed)
    if output is not None:
        from rcomp.io.atomic import check_output_path

        if len(attacks) != 1:
            raise RcompError("-o saves the examples of one attack at one eps; give a single --attack and --eps")
        check_output_path(Path(output), (path,), force=force)
    dev = resolve_device(device)

    from rcomp.cli.common import load_model
    from rcomp.data.registry import check_fits, get_dataset, make_loader
    from rcomp.evaluation.robustness import evaluate

    model = load_model(path, dev, arch, trust_factory)
    ds = get_dataset(data, split, model.meta.input, data_dir)
    check_fits(ds, model.meta.num_classes, data)
    loader = make_loader(ds, batch_size, n=n)
    log(f"attacking {path.name} ({model.meta.arch.name}, gradients: {model.gradient_source}) on {data} {split}, "
        f"{min(n or len(ds), len(ds))} points, device {dev}")

    kept: list = []

    def keep(x, y, advs):
        (xa,) = advs.values()
        kept.append((x.cpu(), xa.cpu(), y.cpu()))

    res = evaluate(model, loader, attacks, device=dev, progress=True, desc="attack",
                   on_batch=keep if output is not None else None)
    if output is not None:
        import torch

        (key, atk), = attacks.items()
        info = {"attack": atk.params(), "source_checkpoint": str(path), "source_sha256": model.source_sha256,
                "arch": model.meta.arch.name, "gradient_source": model.gradient_source, "data": data,
                "split": split, "n": res.n, "input_shape": list(model.meta.input.shape), "clean_acc": res.clean_acc,
                "robust_acc": res.robust_acc[key]}
        save_examples(Path(output), torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept]),
                      torch.cat([k[2] for k in kept]), info, (path,), force)
        log(f"wrote {res.n} adversarial examples to {output}")
    d = report_dict(model, path, res, data, split, dev, output=Path(output) if output else None)
    if json_out:
        emit_json(d)
    else:
        print_report(d)


def _replay(path: Path, src: Path, batch_size: int, n: int | None, device: str, arch: str | None, trust: bool,
            json_out: bool) -> None:
    from rcomp.cli.common import load_model, resolve_device
    from rcomp.evaluation.robustness import evaluate_pairs

    if not src.exists():
        raise RcompError(f"--from {src} does not exist; check the path")
    x, xa, y, info = load_examples(src)
    dev = resolve_device(device)
    model = load_model(path, dev, arch, trust)
    want = tuple(model.meta.input.shape)
    if tuple(x.shape[1:]) != want:
        raise RcompError(f"--from {src} holds {'x'.join(map(str, x.shape[1:]))} images but {path.name} takes "
                         f"{'x'.join(map(str, want))}; replay examples made for this input shape")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= model.meta.num_classes):
        raise RcompError(f"--from {src} has labels up to {int(y.max())} but {path.name} outputs "
                         f"{model.meta.num_classes} classes; replay examples made for this task")
    if n is not None:
        x, xa, y = x[:n], xa[:n], y[:n]
    params = info.get("attack", {}) if isinstance(info.get("attack"), dict) else {}
    name = f"{params.get('attack', 'saved')} (transfer)"
    res = evaluate_pairs(model, x, xa, y, batch_size=batch_size, device=dev, name=name,
                         norm=params.get("norm", "linf"))
    res.attacks[name].params = {**params, "transfer_from": info.get("source_checkpoint"),
                                "transfer_from_sha256": info.get("source_sha256")}
    source = {"path": str(src), "source_checkpoint": info.get("source_checkpoint"),
              "source_sha256": info.get("source_sha256"), "data": info.get("data"), "split": info.get("split")}
    d = report_dict(model, path, res, None, None, dev, source=source)
    if json_out:
        emit_json(d)
    else:
        print_report(d)
