"""``rcomp prune``: structured channel pruning (torch-pruning dependency graph), saved without pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcomp.cli.common import (
    ArchOpt,
    CkptArg,
    ConfigOpt,
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    SeedOpt,
    TrustOpt,
    emit_json,
    emit_path,
    input_checkpoint,
    log,
    parse_number,
    resolve_output,
)
from rcomp.errors import RcompError


def _fraction(text: str | None, what: str) -> float | None:
    if text is None:
        return None
    v = parse_number(text, what)
    if not 0 < v < 1:
        raise RcompError(f"{what} {text!r} must lie strictly between 0 and 1, e.g. {what} 0.5")
    return v


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _taylor_batches(model, data: str, data_dir, batches: int, batch_size: int, seed: int) -> list:
    from rcomp.data.registry import check_fits, get_dataset, make_loader

    if batches < 1 or batch_size < 1:
        raise RcompError("--batches and --batch-size must be at least 1")
    ds = get_dataset(data, "train", model.meta.input, data_dir, seed=seed)
    check_fits(ds, model.meta.num_classes, data)
    out = []
    for x, y in make_loader(ds, batch_size, shuffle=True, seed=seed):
        out.append((x, y))
        if len(out) >= batches:
            break
    return out


def prune(
    ckpt: CkptArg = None,
    ratio: Annotated[str | None, typer.Option("--ratio", help="Fraction of channels to remove, in (0, 1).",
                                              show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", help="Channel importance: l1 (filter L1 norm, the study's), l2, "
                                                         "random, bn-scale (BatchNorm |gamma|) or taylor (needs --data).")
                      ] = "l1",
    scope: Annotated[str, typer.Option("--scope", help="local: the same ratio in every layer; global: rank all "
                                                       "channels together.")] = "local",
    round_to: Annotated[int | None, typer.Option("--round-to", help="Keep channel counts a multiple of N "
                                                                    "(e.g. 8, for fast kernels).",
                                                 show_default=False)] = None,
    ignore: Annotated[str | None, typer.Option("--ignore", help="Comma-separated layers never pruned (module paths "
                                                                "such as layer1.0.conv1); the classifier's outputs "
                                                                "are never pruned anyway.", show_default=False)] = None,
    iterative: Annotated[int, typer.Option("--iterative", help="Reach the ratio in K equal steps, re-scoring "
                                                               "channels after each.")] = 1,
    target_macs: Annotated[str | None, typer.Option("--target-macs", help="Instead of --ratio: keep this fraction "
                                                                          "of the MACs (the ratio is searched).",
                                                    show_default=False)] = None,
    target_params: Annotated[str | None, typer.Option("--target-params", help="Instead of --ratio: keep this "
                                                                              "fraction of the parameters.",
                                                      show_default=False)] = None,
    data: Annotated[str | None, typer.Option("--data", help="Dataset whose training batches give the gradients "
                                                            "for --method taylor.", show_default=False)] = None,
    data_dir: DataDirOpt = None,
    batches: Annotated[int, typer.Option("--batches", help="Batches of --data used by --method taylor.")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size for --method taylor.")] = 64,
    output: OutputOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    arch: ArchOpt = None,
    trust_factory: TrustOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Remove whole channels (filters) so the model gets smaller and faster; saves a safetensors checkpoint.

    Dependency-graph pruning (torch-pruning) keeps residual, depthwise and concatenated channels
    consistent; the classifier's outputs are never pruned. The output reloads from safetensors
    alone (no pickle) and chains into finetune, quantize, attack, bench and info. Parameters,
    MACs and the ratio reached are printed on stderr; stdout gets only the output path.

    Examples:

    \b
      rcomp prune model.safetensors --ratio 0.5 -o model.p50.safetensors
      rcomp prune model.safetensors --target-macs 0.25 --scope global --round-to 8
      rcomp prune model.safetensors --ratio 0.3 --method taylor --data digits --iterative 3
      rcomp prune model.safetensors --ratio 0.5 | rcomp finetune --data digits --epochs 3
    """
    from rcomp.cli.common import load_model, resolve_device, seed_everything
    from rcomp.io.checkpoint import save
    from rcomp.io.format import history_entry
    from rcomp.prune import METHODS, SCOPES
    from rcomp.prune import prune as prune_model
    from rcomp.prune.pruner import resolve_ignore

    r = _fraction(ratio, "--ratio")
    tm = _fraction(target_macs, "--target-macs")
    tpar = _fraction(target_params, "--target-params")
    if sum(v is not None for v in (r, tm, tpar)) != 1:
        raise RcompError("give exactly one of --ratio, --target-macs or --target-params, e.g. --ratio 0.5")
    method, scope = method.strip().lower(), scope.strip().lower()
    if method not in METHODS:
        raise RcompError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise RcompError(f"--scope {scope!r} is not one of {', '.join(SCOPES)}")
    if method == "taylor" and not data:
        raise RcompError("--method taylor needs gradients from data: add --data NAME (e.g. --data digits)")
    if round_to is not None and round_to < 1:
        raise RcompError(f"--round-to must be at least 1, got {round_to}")
    if iterative < 1:
        raise RcompError(f"--iterative must be at least 1, got {iterative}")
    inp = input_checkpoint(ckpt)
    if r is not None:
        suffix = f"prune{r:g}"
    else:
        suffix = f"prune-macs{tm:g}" if tm is not None else f"prune-params{tpar:g}"
    out = resolve_output(output, inp, suffix, force)
    dev = resolve_device(device)
    seed_everything(seed)
    model = load_model(inp, dev, arch, trust_factory)
    ignore_list = resolve_ignore(model.net, [s.strip() for s in (ignore or "").split(",") if s.strip()])
    taylor = None
    if method == "taylor":
        taylor = _taylor_batches(model, data, data_dir, batches, batch_size, seed)
    elif data:
        log(f"note: --data is used only by --method taylor; {method} ignores it")
    model, rep = prune_model(model, r, method=method, scope=scope, round_to=round_to, ignore=ignore_list,
                             iterative=iterative, target_macs=tm, target_params=tpar, batches=taylor, seed=seed,
                             log=log)
    log(f"pruned {inp} ({model.meta.arch.name}) with {method} importance, {scope} scope"
        + (f", {iterative} steps" if iterative > 1 else "") + (f", target {rep.target}" if rep.target else ""))
    log(f"params {_human(rep.params_before)} -> {_human(rep.params_after)} ({rep.params_factor:.2f}x fewer), "
        f"MACs {_human(rep.macs_before)} -> {_human(rep.macs_after)} ({rep.macs_factor:.2f}x fewer)")
    log(f"channels removed: {rep.ratio_reached:.1%} (requested {rep.ratio_requested:.1%}); classifier "
        f"{rep.classifier!r} kept; pruning took {rep.seconds:.2f} s")
    params = {"ratio": r, "target_macs": tm, "target_params": tpar, "method": method, "scope": scope,
              "round_to": round_to, "ignore": ignore_list or None, "iterative": iterative, "seed": seed,
              "data": data if method == "taylor" else None, "batches": batches if method == "taylor" else None}
    metrics = {k: getattr(rep, k) for k in ("ratio_requested", "ratio_reached", "params_before", "params_after",
                                             "macs_before", "macs_after")}
    model.meta.history.append(history_entry("prune", params, model.source_sha256, metrics))
    model.to("cpu")
    sha = save(model, out, force=force, inputs=(inp,))
    log(f"wrote {out} (sha256 {sha[:12]})")
    if json_out:
        emit_json({"path": str(out), "sha256": sha, **rep.as_dict()})
    else:
        emit_path(Path(out))
