"""The prune stage: structured channel pruning (torch-pruning's dependency graph), saved without pickle."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcomp import options as O
from rcomp.errors import RcompError
from rcomp.pruning.catalog import IMPORTANCES, SCOPES, data_methods, needs_data
from rcomp.stages import common as C

SUMMARY = "Remove whole channels (filters) so the model gets smaller and faster; saves a safetensors checkpoint."
DOC = """Dependency-graph pruning (torch-pruning) keeps residual, depthwise and concatenated channels
consistent; the classifier's outputs are never pruned. The output reloads from safetensors
alone (no pickle) and chains into finetune, quantize, attack, bench and info. Parameters,
MACs and the ratio reached are printed on stderr; stdout gets only the output path."""
EXAMPLES = """rcomp prune model.safetensors --ratio 0.5 -o model.p50.safetensors
rcomp prune model.safetensors --target-macs 0.25 --scope global --round-to 8
rcomp prune model.safetensors --ratio 0.3 --method taylor --data digits --iterative 3
rcomp prune robust.safetensors --ratio 0.5 --method hydra --data digits --adv-eps 0.1
rcomp prune model.safetensors --ratio 0.5 | rcomp finetune --data digits --epochs 3"""


@dataclass
class Config:
    ratio: float | None = O.opt(None, "--ratio", kind="fraction", help="Fraction of channels to remove, in (0, 1).")
    method: str = O.opt("l1", "--method", kind="choice", choices=IMPORTANCES.choices(),
                      help="Channel importance: " + "; ".join(f"{e.name}: {e.help}" for e in
                                                              IMPORTANCES.entries(plugins=False))
                           + f" (installed plugins: {IMPORTANCES.listing}).")
    scope: str = O.opt("local", "--scope", kind="choice", choices=SCOPES,
                     help="local: the same ratio in every layer; global: rank all channels together.")
    round_to: int | None = O.opt(None, "--round-to", kind="int", min=1, max=4096,
                               help="Keep channel counts a multiple of N (e.g. 8, for fast kernels).")
    ignore: tuple[str, ...] = O.opt((), "--ignore", kind="names",
                                  help="Comma-separated layers never pruned (module paths such as layer1.0.conv1); "
                                       "the classifier's outputs are never pruned anyway.")
    iterative: int = O.opt(1, "--iterative", kind="int", min=1, max=100,
                         help="Reach the ratio in K equal steps, re-scoring channels after each.")
    target_macs: float | None = O.opt(None, "--target-macs", kind="fraction",
                                    help="Instead of --ratio: keep this fraction of the MACs (the ratio is searched).")
    target_params: float | None = O.opt(None, "--target-params", kind="fraction",
                                      help="Instead of --ratio: keep this fraction of the parameters.")
    data: str | None = O.opt(None, "--data", help="Dataset whose training batches give the gradients for --method "
                                                "taylor.")
    data_dir: Path | None = O.data_dir_opt()
    batches: int = O.opt(4, "--batches", kind="int", min=1, max=10000,
                       help="Batches of --data used by --method taylor or hydra.")
    batch_size: int = O.batch_opt(64, "Batch size for --method taylor or hydra.")
    adv_eps: float | None = O.opt(None, "--adv-eps", kind="eps",
                                help="Score channels on PGD adversarial examples at this L-inf eps (pixel units) "
                                     "instead of clean images: robustness-aware pruning (taylor; hydra needs it).")
    adv_steps: int = O.opt(5, "--adv-steps", kind="int", min=1, max=1000, help="PGD steps of those examples.")
    score_steps: int = O.opt(100, "--score-steps", kind="int", min=1, max=10000,
                           help="hydra: optimisation steps of the learned channel scores (Sehwag et al. 2020).")
    output: Path | None = O.output_opt()
    force: bool = O.force_opt()
    device: str = O.device_opt("cpu")
    seed: int = O.seed_opt()
    json: bool = O.json_opt()
    arch: str | None = C.arch_opt()
    trust_factory: bool = O.trust_opt()

    def check(self) -> None:
        if sum(v is not None for v in (self.ratio, self.target_macs, self.target_params)) != 1:
            raise RcompError("give exactly one of --ratio, --target-macs or --target-params, e.g. --ratio 0.5")
        C.check_data(self.data, self.data_dir)
        if self.method == "hydra" and self.adv_eps is None:
            raise RcompError("--method hydra learns scores against adversarial examples: add --adv-eps E "
                             "(e.g. --adv-eps 0.1)")
        if self.method in IMPORTANCES.builtin and self.adv_eps is not None and \
                "adv_eps" not in IMPORTANCES.get(self.method).takes:
            raise RcompError(f"--adv-eps scores channels by gradients: use it with --method "
                             f"{' or '.join(data_methods())}, not {self.method}")

    @property
    def suffix(self) -> str:
        if self.ratio is not None:
            return f"prune{self.ratio:g}"
        return f"prune-macs{self.target_macs:g}" if self.target_macs is not None else \
            f"prune-params{self.target_params:g}"


def check_source(cfg: Config, meta, tensors: tuple[str, ...], where: str) -> None:
    """What the checkpoint's header already rules out: pruning a quantized model, bn-scale without BatchNorm."""
    q = C.quant_text(meta)
    if q:
        raise RcompError(f"{where} is quantized ({q}); pruning works on float models: prune the float checkpoint "
                         "it was made from, then quantize the result")
    if cfg.method == "bn-scale" and not any(t.endswith(".running_var") for t in tensors):
        raise RcompError(f"--method bn-scale needs BatchNorm layers and {where} ({meta.arch.name}) has none; use "
                         "--method l1")
    if needs_data(cfg.method):  # the one --data rule, before anything loads
        C.resolve_data(cfg.data, meta.dataset, where, cfg.data_dir, log=_no_log, why=f"--method {cfg.method}")


def _no_log(msg: str) -> None:
    """A header check says nothing: the stage says which data it took when it takes it."""


def _taylor_batches(model, cfg: Config, log) -> list:
    from rcomp.data.registry import check_fits, get_dataset, make_loader

    ds = get_dataset(cfg.data, "train", model.meta.input, cfg.data_dir, seed=cfg.seed, log=log)
    check_fits(ds, model.meta.num_classes, cfg.data)
    out = []
    for x, y in make_loader(ds, cfg.batch_size, shuffle=True, seed=cfg.seed):
        out.append((x, y))
        if len(out) >= cfg.batches:
            break
    return out


def _takes(cfg: Config, option: str) -> bool:
    return option in IMPORTANCES.get(cfg.method).takes


def apply(model, cfg: Config, log=C.stderr_log, source: str = "model", copy: bool = True) -> C.StageResult:
    """A pruned copy of ``model`` (which is left unchanged) with the history entry recorded on it.
    ``copy=False`` prunes ``model`` itself (for a caller that owns it, e.g. :func:`run`)."""
    from rcomp.pruning import prune as prune_model
    from rcomp.pruning.pruner import check_prunable, resolve_ignore

    check_prunable(model.net, model.meta.arch.name)  # before any data is loaded
    check_source(cfg, model.meta, tuple(name for name, _ in model.named_buffers()), source)
    if copy:
        model = C.copy_model(model)

    ignore_list = resolve_ignore(model.net, list(cfg.ignore))
    if needs_data(cfg.method):
        cfg = dataclasses.replace(cfg, data=C.resolve_data(cfg.data, model.meta.dataset, source, cfg.data_dir, log,
                                                           why=f"--method {cfg.method}"))
    batches = _taylor_batches(model, cfg, log) if needs_data(cfg.method) else None
    if cfg.data and batches is None:
        log(f"note: --data is used only by --method {'/'.join(data_methods())}; {cfg.method} ignores it")
    model, rep = prune_model(model, cfg.ratio, method=cfg.method, scope=cfg.scope, round_to=cfg.round_to,
                             ignore=ignore_list, iterative=cfg.iterative, target_macs=cfg.target_macs,
                             target_params=cfg.target_params, batches=batches, seed=cfg.seed, log=log,
                             **({"adv_eps": cfg.adv_eps, "adv_steps": cfg.adv_steps} if cfg.adv_eps is not None else {}),
                             **({"score_steps": cfg.score_steps} if _takes(cfg, "score_steps") else {}))
    log(f"pruned {source} ({model.meta.arch.name}) with {cfg.method} importance, {cfg.scope} scope"
        + (f", {cfg.iterative} steps" if cfg.iterative > 1 else "") + (f", target {rep.target}" if rep.target else ""))
    log(f"params {C.human(rep.params_before)} -> {C.human(rep.params_after)} ({rep.params_factor:.2f}x fewer), "
        f"MACs {C.human(rep.macs_before)} -> {C.human(rep.macs_after)} ({rep.macs_factor:.2f}x fewer)")
    log(f"channels removed: {rep.ratio_reached:.1%} (requested {rep.ratio_requested:.1%}); classifier "
        f"{rep.classifier!r} kept; pruning took {rep.seconds:.2f} s")
    taylor = needs_data(cfg.method)
    params = {"ratio": cfg.ratio, "target_macs": cfg.target_macs, "target_params": cfg.target_params,
              "method": cfg.method, "scope": cfg.scope, "round_to": cfg.round_to, "ignore": ignore_list or None,
              "iterative": cfg.iterative, "seed": cfg.seed, "data": cfg.data if taylor else None,
              "batches": cfg.batches if taylor else None,
              **({"adv_eps": cfg.adv_eps, "adv_steps": cfg.adv_steps} if cfg.adv_eps is not None else {}),
              **({"score_steps": cfg.score_steps} if _takes(cfg, "score_steps") else {})}
    metrics = {k: getattr(rep, k) for k in ("ratio_requested", "ratio_reached", "params_before", "params_after",
                                             "macs_before", "macs_after")}
    entry = C.record(model, "prune", params, getattr(model, "source_sha256", None), metrics)
    return C.StageResult(model=C.derived(model), report=rep.as_dict(), entry=entry)


def run(cfg: Config, inputs: list, *, log=C.stderr_log, default_output: bool = True, **_: Any) -> C.StageResult:
    """Load -> prune -> record -> save. ``inputs[0]`` is a checkpoint path or a loaded model (left as it
    was); without ``cfg.output`` the output goes beside the input, or (``default_output=False``, the
    Python API) nothing is written."""
    inp, given = C.split_input(inputs[0])
    if inp is not None:
        C.check_source(sys.modules[__name__], cfg, inp)
    out = C.plan_output(cfg.output, inp, cfg.suffix, cfg.force, model=given, default=default_output)
    dev = C.resolve_device(cfg.device)
    C.seed_everything(cfg.seed)
    model = given if given is not None else C.as_model(inp, dev, cfg.arch, cfg.trust_factory)
    res = apply(model, cfg, log, source=str(inp) if inp is not None else "model", copy=given is not None)
    res.model.to("cpu")
    C.publish(res, out, cfg.force, C.input_files(inp, given))
    if out is not None:
        log(f"wrote {out} (sha256 {res.sha256[:12]})")
    return res
