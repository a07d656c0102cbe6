"""Side-by-side benchmark of checkpoints: cost (parameters, MACs, size, latency) and clean,
robust and worst-case accuracy on the same points, as one JSON-able dict (what ``rcomp bench``
formats and ``--fail-under`` checks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rcomp.attacks.catalog import ATTACKS
from rcomp.errors import RcompError

DEFAULT_LATENCY_BATCHES = (1, 64)


def attack_key(name: str, eps: float, several_eps: bool) -> str:
    """``pgd`` when one eps is evaluated, ``pgd@8/255`` when several (the eps as the user wrote it)."""
    from rcomp.parsing import eps_text

    return f"{name}@{eps_text(eps)}" if several_eps else name


def build_attacks(names: Sequence[str], eps: Sequence[float], *, lenient: bool = False,
                  **kw: Any) -> dict[str, Any]:
    """``{key: attack}`` for every attack name and eps (floats in pixel units; an
    :class:`~rcomp.parsing.Eps` keeps the text the key shows, e.g. ``8/255``).

    ``kw`` goes to :func:`rcomp.attacks.make_attack`. With ``lenient`` (several attacks listed
    together), options an attack does not take (its catalogue entry's ``takes``) are left out for
    it instead of refused. The suite ``auto`` is expanded into its stages (``apgd-ce``, ``apgd-t``,
    ``square``, each keyed with the eps when several are given), in cascade order; :func:`bench`
    and :func:`~rcomp.evaluation.robustness.evaluate` cascade them.
    """
    from rcomp.attacks import make_attack
    from rcomp.evaluation.cascade import expand_suites

    bad = [e for e in eps if isinstance(e, (str, bool)) or not isinstance(e, (int, float))]
    if bad:
        raise RcompError(f"eps {bad[0]!r} is not a number; parse text once with rcomp.parsing.parse_eps_list")
    several = len(eps) > 1
    out: dict[str, Any] = {}
    for name in names:
        for e in eps:
            key = attack_key(name, e, several)
            stages = expand_suites({key: make_attack(name, float(e), lenient=lenient, **kw)})
            for k, a in stages.items():
                if k in out:
                    suites = [n for n in names if n != name and ATTACKS.get(n).get("suite")]
                    if len(stages) > 1 or suites:  # a suite's stage met the same attack listed on its own
                        suite = name if len(stages) > 1 else suites[0]
                        raise RcompError(f"{suite} already runs {k.split('@')[0]} as one of its stages; list "
                                         f"{suite} or {k.split('@')[0]}, not both")
                    raise RcompError(f"attack {k} is listed twice; list each attack and eps once")
                out[k] = a
    return out


def _load(item, device: str, arch: str | None, trust: bool):
    from rcomp.models.loading import load
    from rcomp.models.wrapper import on_device

    if isinstance(item, (str, Path)):
        return load(Path(item), device=device, factory=arch, trust_factory=trust), Path(item)
    return on_device(item, device), getattr(item, "source_path", None)  # a caller's model stays where it was


def _macs(model) -> int | None:
    from rcomp.evaluation.cost import count_macs

    try:
        return count_macs(model, tuple(model.meta.input.shape))
    except Exception:  # noqa: BLE001 - a model the counter cannot run still gets its other figures
        return None


def _quant_summary(model) -> dict[str, Any] | None:
    """Bits, scheme and backend of a quantized model (scalar fields of its quantization state)."""
    q = model.meta.compression.get("quantization")
    if not q:
        return None
    return {k: v for k, v in q.items() if isinstance(v, (str, int, float, bool))}


def check_compilable(model, name: str) -> None:
    """``--compile`` times pt2e int8 models only (torch.ao's int8 modules and others are not compiled)."""
    check_compilable_record(None if getattr(model, "is_onnx", False) else model.meta.compression, name)


def check_compilable_record(compression: dict | None, name: str) -> None:
    """:func:`check_compilable` from a checkpoint's compression record (its header), None for an ONNX file."""
    from rcomp.quant import catalog as qc

    if compression is None:
        raise RcompError(f"--compile times pt2e int8 checkpoints; {name} is an ONNX file, run by onnxruntime: drop "
                         "--compile")
    q = compression.get("quantization") or {}
    if not (qc.is_real(q) and qc.runtime(q.get("backend", "")) == qc.PT2E):
        what = qc.label(q) if q else "a float model"
        fix = ("quantize its float checkpoint with rcomp quantize (pt2e is the default)" if q else
               "quantize it with rcomp quantize (pt2e is the default)")
        raise RcompError(f"--compile times pt2e int8 models only; {name} is {what}: {fix}, or drop --compile")


def _compiled(model, log, name: str):
    """The model with its pt2e int8 network under torch.compile (compiled on the first, untimed, call per shape)."""
    from torch import nn

    from rcomp.quant.pt2e import compiled

    if log:
        log(f"{name}: timing under torch.compile (inductor); each batch size compiles once, untimed (seconds)")
    return nn.Sequential(model.normalize, compiled(model.net)).eval()


def bench(paths_or_models: Sequence, data: str, attacks: dict[str, Any], *, split: str = "test",
          n: int | None = None, batch_size: int = 128, device: str = "cpu", data_dir: str | Path | None = None,
          latency_batches: Sequence[int] = DEFAULT_LATENCY_BATCHES, arch: str | None = None,
          trust_factory: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
          cascade: bool = False, records: Callable[[Any, Path | None, int], Any] | None = None,
          shard: tuple[int, int] | None = None, names: Sequence[str] | None = None,
          compile_latency: bool = False) -> dict[str, Any]:
    """Benchmark each checkpoint (path or loaded Classifier) on ``n`` points of ``data`` (all if None).

    ``attacks`` maps display keys to attacks (see :func:`build_attacks`); each model is attacked
    from the same seeded state, so models are compared on the same random starts. Returns
    ``{"data", "split", "n", "device", "threads", "attacks": {key: params}, "models": [...]}``;
    each model has ``path``, ``name``, ``sha256``, ``arch``, ``params``, ``macs``, ``size_bytes``,
    ``latency_ms`` (batch size -> median ms), ``latency`` (batch size -> median, quartiles, min/max and
    whether the spread is small enough to trust), ``clean_acc``, ``robust_acc`` (key -> accuracy),
    ``worst_case_acc``, ``success_rate``, ``gradient_source``, ``mode`` (``cascade`` or
    ``independent``), ``seed``, ``stage_robust_acc`` (key -> robust accuracy after that attack and
    the ones before it), ``gradient_masking_suspected`` (see :mod:`rcomp.evaluation.cascade`) and
    ``eval_seconds``. ``cascade``: run each attack only on the points still robust after the
    earlier ones (always on for the ``auto`` suite's stages). ``records(model, path, n)``, if given,
    returns the :class:`~rcomp.evaluation.records.RecordDir` each model's evaluation writes to;
    ``shard=(rank, world)`` splits each evaluation's batches over torchrun processes (see
    :func:`~rcomp.evaluation.robustness.evaluate`). ``names`` label the models (default:
    the file name, else ``model{i}``). The result's ``points`` says which points were evaluated
    (``n`` of a split is a stratified sample with a fixed seed: :mod:`rcomp.data.subset`).
    """
    import torch

    from rcomp.attacks.auto import surrogate_note
    from rcomp.data.registry import check_fits, get_dataset, make_loader
    from rcomp.evaluation.cascade import expand_suites
    from rcomp.evaluation.cost import count_params, measure_latency
    from rcomp.evaluation.robustness import evaluate

    if not paths_or_models:
        raise RcompError("give at least one checkpoint to benchmark")
    attacks = expand_suites(attacks)
    rows = []
    n_eval = points = None
    for i, item in enumerate(paths_or_models):
        model, path = _load(item, device, arch, trust_factory)
        name = names[i] if names else path.name if path is not None else f"model{i}"
        if compile_latency:
            check_compilable(model, name)
        if log:
            log(f"[{i + 1}/{len(paths_or_models)}] {name}: {model.meta.arch.name}, gradient {model.gradient_source}")
            note = surrogate_note(attacks, model.gradient_source)
            if note:
                log(note)
        ds = get_dataset(data, split, model.meta.input, data_dir)
        check_fits(ds, model.meta.num_classes, data)
        loader = make_loader(ds, batch_size, n=n)
        for a in attacks.values():  # every model sees the same random streams
            if hasattr(a, "reset"):
                a.reset()
        store = records(model, path, len(loader.dataset)) if records is not None else None
        res = evaluate(model, loader, attacks, device=device, progress=progress, desc=name[:24], cascade=cascade,
                       store=store, shard=shard)
        for line in (res.checks or {}).get("warnings", []) if log else ():
            log(f"warning: {name}: {line}")
        n_eval, points = res.n, getattr(loader, "points", None)
        shape = tuple(model.meta.input.shape)
        timed = _compiled(model, log, name) if compile_latency else model
        spread = {str(b): measure_latency(timed, shape, b, device=device) for b in latency_batches if b > 0}
        lat = {b: round(st["median_ms"], 4) for b, st in spread.items()}
        sha = model.source_sha256
        if sha is None and path is not None:
            from rcomp.io.header import sha256_file

            sha = sha256_file(path)
        rows.append({
            "path": str(path) if path is not None else None,
            "name": name,
            "sha256": sha,
            "arch": model.meta.arch.name,
            "quantized": bool(getattr(model, "is_quantized", False)),
            "quantization": _quant_summary(model),
            "params": count_params(model),
            "macs": _macs(model),
            "size_bytes": os.path.getsize(path) if path is not None else None,
            "latency_ms": lat,
            "latency_compiled": bool(compile_latency),
            "latency": {b: {k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()}
                        for b, st in spread.items()},
            "clean_acc": res.clean_acc,
            "robust_acc": dict(res.robust_acc),
            "worst_case_acc": res.worst_case_acc,
            "success_rate": dict(res.success_rate),
            "gradient_source": model.gradient_source,
            "mode": res.mode,
            "seed": res.seed,
            "stage_robust_acc": dict(res.stage_robust_acc),
            "gradient_masking_suspected": res.gradient_masking_suspected,
            "checks": res.checks,
            "eval_seconds": round(res.seconds, 3),
        })
    return {
        "data": data,
        "split": split,
        "n": n_eval,
        "points": points,
        "device": device,
        "threads": torch.get_num_threads(),
        "attacks": {k: a.params() for k, a in attacks.items()},
        "models": rows,
    }


def check_metrics(thresholds: dict[str, float], attack_keys: Sequence[str]) -> dict[str, float]:
    """``thresholds`` (metric -> accuracy, parsed at the boundary) naming only known metrics: clean,
    worst and the attack keys."""
    known = ["clean", "worst", *attack_keys]
    for key in thresholds:
        if key not in known:
            raise RcompError(f"--fail-under names unknown metric {key!r}; choose from {', '.join(known)}")
    return dict(thresholds)


def check_thresholds(result: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    """Messages for every model and metric below its threshold (empty when all pass)."""
    misses = []
    for m in result["models"]:
        for key, lim in thresholds.items():
            val = m["clean_acc"] if key == "clean" else m["worst_case_acc"] if key == "worst" else m["robust_acc"][key]
            if val < lim:
                misses.append(f"{m['name']}: {key} {val:.4f} < {lim:g}")
    return misses
