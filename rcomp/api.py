"""The Python API of the stages: the same options, checks and provenance as the command line.

>>> import rcomp
>>> model = rcomp.load("dense.safetensors")
>>> model = rcomp.prune(model, ratio=0.5)                               # doctest: +SKIP
>>> model = rcomp.finetune(model, data="digits", adv="pgd", eps=0.1)   # doctest: +SKIP
>>> report = rcomp.bench([model], data="digits", attack="auto", eps=0.1)  # doctest: +SKIP
>>> rcomp.save(model, "robust.safetensors")                             # doctest: +SKIP
>>> [h["command"] for h in model.meta.history]                          # doctest: +SKIP
['finetune', 'prune', 'finetune']

Options are keyword arguments named as on the command line (``data_dir`` or ``"data-dir"``),
validated by the same declarations; values may be typed (``eps=8/255``) or text (``eps="8/255"``).
Each stage that changes a model records its history entry on it, so :func:`rcomp.save` writes
the full provenance. Logs go to stderr; pass ``log=`` to redirect them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcomp.stages.common import Log, stderr_log


def _config(name: str, options: dict[str, Any]):
    from rcomp.options import make_config
    from rcomp.stages import get_stage

    return make_config(get_stage(name).config, options, command=name)


def _model(model: Any, cfg: Any, device: str = "cpu", stage: Any = None):
    """The model to operate on: ``model`` itself, or the checkpoint it names, loaded after the header has
    been checked against the stage's options (an unsupported combination is refused before loading)."""
    from rcomp.stages.common import as_model, check_input, check_source

    if stage is not None and isinstance(model, (str, Path)):
        check_source(stage, cfg, check_input(Path(model)))
    return as_model(model, device, getattr(cfg, "arch", None), getattr(cfg, "trust_factory", False))


def prune(model: Any, *, log: Log = stderr_log, **options: Any):
    """Prune ``model`` (a loaded model or a checkpoint path); returns the pruned model, a new one: ``model``
    is left as it was."""
    from rcomp.stages import prune as stage
    from rcomp.stages.common import seed_everything

    cfg = _config("prune", options)
    seed_everything(cfg.seed)
    return stage.apply(_model(model, cfg, stage=stage), cfg, log, copy=not isinstance(model, (str, Path))).model


def quantize(model: Any, *, log: Log = stderr_log, **options: Any):
    """Quantize ``model`` to int8 or (``simulate=True``) fake-quant ``bits``; returns the quantized model, a new
    one: ``model`` is left as it was."""
    from rcomp.stages import quantize as stage
    from rcomp.stages.common import seed_everything

    cfg = _config("quantize", options)
    seed_everything(cfg.seed)
    return stage.apply(_model(model, cfg, stage=stage), cfg, log).model


def finetune(model: Any = None, *, log: Log = stderr_log, **options: Any):
    """Train ``model`` (or, with ``model=None`` and ``arch=NAME``, a new one) on ``data`` (default: the dataset
    ``model`` records); returns the trained model, a new one: ``model`` is left as it was."""
    from rcomp.stages import finetune as stage
    from rcomp.stages.common import resolve_device, seed_everything

    cfg = _config("finetune", options)
    seed_everything(cfg.seed)
    source = Path(model) if isinstance(model, (str, Path)) else None
    net = stage.build(cfg, log) if model is None else _model(model, cfg)
    res = stage.apply(net, cfg, source=source, dev=resolve_device(cfg.device), log=log,
                      from_scratch=model is None, copy=model is not None and source is None)
    return res.model.cpu()


def attack(model: Any, *, log: Log = stderr_log, **options: Any) -> dict[str, Any]:
    """Attack ``model`` on ``data`` and return the report (what ``rcomp attack --json`` prints); with
    ``from_file``, replay saved examples against it instead (``rcomp attack --from``)."""
    from rcomp.io.atomic import check_output_path
    from rcomp.stages import attack as stage
    from rcomp.stages.common import check_input

    cfg = _config("attack", options)
    path = check_input(Path(model)) if isinstance(model, (str, Path)) else None
    if cfg.from_file is not None:
        return stage._replay(cfg, path, None if path is not None else model).report
    attacks = cfg.build(cfg.seed)  # refuse bad attack settings before loading anything
    if cfg.output is not None:
        check_output_path(Path(cfg.output), (path,) if path is not None else (), force=cfg.force)
    return stage.apply(_model(model, cfg), cfg, log, path, attacks).report


def bench(models: list, *, log: Log = stderr_log, **options: Any) -> dict[str, Any]:
    """Benchmark ``models`` (loaded or paths) side by side; returns the result (``--format json``). Rows are
    named by file name, or for a model made in memory by its architecture and last command (``convnet8
    prune``), made unique with its position (``[2]``)."""
    from rcomp.stages import bench as stage

    res = stage.run(_config("bench", options), list(models), log=log)
    res.raise_failures()
    return res.report


def export(checkpoint: str | Path, *, log: Log = stderr_log, **options: Any) -> dict[str, Any]:
    """Export the checkpoint file ``checkpoint`` to ONNX (``output=...onnx``); returns the report (path,
    sha256, parity). Raises :class:`~rcomp.errors.ThresholdError` and writes nothing when ONNX Runtime
    disagrees with the checkpoint."""
    from rcomp.stages import export as stage

    return stage.run(_config("export", options), [Path(checkpoint)], log=log).report


def convert(src: str | Path, *, log: Log = stderr_log, **options: Any):
    """Read plain weights ``src`` as architecture ``arch``; returns the model (save it with rcomp.save)."""
    from rcomp.stages import convert as stage

    return stage.convert(_config("convert", options), Path(src), log).model
