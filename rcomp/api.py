"""The Python API of the stages: the same options, checks and provenance as the command line.

>>> import rcomp
>>> model = rcomp.load("dense.safetensors")
>>> model = rcomp.prune(model, ratio=0.5).model                                  # doctest: +SKIP
>>> model = rcomp.finetune(model, data="digits", adv="pgd", eps=0.1).model      # doctest: +SKIP
>>> report = rcomp.bench([model], data="digits", attack="auto", eps=0.1).report  # doctest: +SKIP
>>> rcomp.save(model, "robust.safetensors")                                      # doctest: +SKIP
>>> [h["command"] for h in model.meta.history]                                   # doctest: +SKIP
['finetune', 'prune', 'finetune']

Every stage function has one shape: a loaded model or a checkpoint path in (``convert``: a weights
file; ``bench``: a list of them), a :class:`Result` out, with ``.model`` (the model the stage made,
a new one: the input is left as it was; None for ``attack``, ``bench`` and ``export``), ``.report``
(what ``--json`` prints for the command) and ``.path`` (the file written when ``output=`` was given,
else None: nothing is written without it). ``output=`` is written as the command line writes ``-o``:
atomically, never over an input, never over an existing file unless ``force=True``.

Options are keyword arguments named as on the command line (``data_dir`` or ``"data-dir"``),
validated by the same declarations; values may be typed (``eps=8/255``) or text (``eps="8/255"``).
Each stage that changes a model records its history entry on it, so :func:`rcomp.save` writes
the full provenance. Logs go to stderr; pass ``log=`` to redirect them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcomp.errors import ThresholdError
from rcomp.stages.common import Log, stderr_log


@dataclass(frozen=True)
class Result:
    """What every stage function returns."""

    #: the model the stage made (None for attack, bench and export)
    model: Any
    #: what ``rcomp COMMAND --json`` prints (bench: ``--format json``)
    report: dict[str, Any]
    #: the file written (``output=``), else None
    path: Path | None

    def __repr__(self) -> str:  # the model's and the report's own reprs run to pages
        arch = getattr(getattr(getattr(self.model, "meta", None), "arch", None), "name", None)
        model = "None" if self.model is None else f"<{type(self.model).__name__} {arch}>"
        return f"Result(model={model}, report=<dict: {', '.join(map(str, self.report))}>, path={self.path!r})"


def _run(name: str, inputs: list, options: dict[str, Any], log: Log, keep_model: bool = True) -> Result:
    """Build the stage's config from the keywords and run the stage as the command line does, writing only
    what ``output=`` names."""
    from rcomp.options import make_config
    from rcomp.stages import get_stage

    stage = get_stage(name)
    res = stage.run(make_config(stage.config, options, command=name), inputs, log=log, default_output=False)
    out = res.output
    result = Result(res.model if keep_model else None, res.report, Path(out) if out is not None else None)
    try:
        res.raise_failures()  # bench --fail-under
    except ThresholdError as exc:
        exc.result = result  # what fell short, still readable
        raise
    return result


def prune(model: Any, *, log: Log = stderr_log, **options: Any) -> Result:
    """Prune ``model`` (a loaded model or a checkpoint path); ``.model`` is the pruned model."""
    return _run("prune", [model], options, log)


def quantize(model: Any, *, log: Log = stderr_log, **options: Any) -> Result:
    """Quantize ``model`` to int8 or (``simulate=True``) fake-quant ``bits``; ``.model`` is the quantized model
    (``backend="onnxruntime"`` writes an ONNX file: give ``output=``; ``.model`` is then None)."""
    return _run("quantize", [model], options, log)


def finetune(model: Any = None, *, log: Log = stderr_log, **options: Any) -> Result:
    """Train ``model`` (or, with ``model=None`` and ``arch=NAME``, a new one) on ``data`` (default: the dataset
    ``model`` records); ``.model`` is the trained model."""
    return _run("finetune", [] if model is None else [model], options, log)


def attack(model: Any, *, log: Log = stderr_log, **options: Any) -> Result:
    """Attack ``model`` on ``data``; ``.report`` is ``rcomp attack --json``'s, ``.path`` the examples file of
    ``output=``. With ``from_file``, replay saved examples against it instead (``rcomp attack --from``)."""
    return _run("attack", [model], options, log, keep_model=False)


def bench(models: list, *, log: Log = stderr_log, **options: Any) -> Result:
    """Benchmark ``models`` (loaded or paths) side by side; ``.report`` is ``--format json``'s, ``.path`` the
    ``output=`` copy. Rows are named by file name, or for a model made in memory by its architecture and last
    command (``convnet8 prune``), made unique with its position (``[2]``). Raises
    :class:`~rcomp.errors.ThresholdError` when a ``fail_under`` threshold is not met; its ``.result`` is the
    Result all the same (``.report`` with the figures that fell short, ``.path`` the ``output=`` file).
    One model or path alone is one row (``rcomp.bench("m.onnx", ...)``)."""
    one = isinstance(models, (str, os.PathLike)) or callable(models)
    return _run("bench", [models] if one else list(models), options, log, keep_model=False)


def export(model: Any, *, log: Log = stderr_log, **options: Any) -> Result:
    """Export ``model`` (a loaded model or a checkpoint path) to ONNX; ``.report`` holds the parity check,
    ``.path`` the ``.onnx`` file of ``output=`` (without it only the check runs). Raises
    :class:`~rcomp.errors.ThresholdError` and writes nothing when ONNX Runtime disagrees with the model."""
    return _run("export", [model], options, log, keep_model=False)


def convert(src: str | Path, *, log: Log = stderr_log, **options: Any) -> Result:
    """Read plain weights ``src`` as architecture ``arch``; ``.model`` is the rcomp model."""
    return _run("convert", [Path(src)], options, log)
