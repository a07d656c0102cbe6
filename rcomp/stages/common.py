"""What every stage shares: devices, seeds, output naming, loading and saving with provenance.

Imports torch lazily.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError

Log = Callable[[str], None]


def _data_help(default: str = "") -> str:
    from rcomp.data.catalog import DATASETS

    return f"Dataset: {DATASETS.help_names()}{default}."


#: the --data help of every stage, from the dataset catalogue
DATA_HELP = _data_help()
#: the same, for stages that default to the dataset the checkpoint records
RECORDED_DATA_HELP = _data_help(" (default: the one the checkpoint records)")


def user_factory_from_file(value: Any) -> str | None:
    """``file_check`` of the options naming an architecture (the architecture catalogue says which names
    are user factories: :func:`rcomp.models.catalog.user_factory_from_file`)."""
    from rcomp.models.catalog import user_factory_from_file as check

    return check(value)


def arch_opt(help: str = "Name the user factory (package.module:factory) the checkpoint was made with."):
    from rcomp.options import opt

    return opt(None, "--arch", help=help, file_check=user_factory_from_file)


def stderr_log(msg: str) -> None:
    """The default log: stderr, so stdout stays for results and output paths."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class StageResult:
    """What a stage returns: the model it made, where it wrote it, and what it measured."""

    model: Any = None
    output: Path | None = None
    sha256: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    entry: dict[str, Any] | None = None
    #: the human rendering, where the stage makes one (bench)
    text: str | None = None
    #: thresholds the results fell short of (bench --fail-under): exit 1 after printing
    failures: list[str] = field(default_factory=list)
    #: finetune --save-at: ``{steps: model}``, the model after that many steps (written beside the output)
    snapshots: dict[int, Any] = field(default_factory=dict)

    def raise_failures(self) -> None:
        from rcomp.errors import ThresholdError

        if self.failures:
            raise ThresholdError("below --fail-under: " + "; ".join(self.failures))


def resolve_device(device: str) -> str:
    import torch

    d = (device or "auto").strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return "cpu"
    if re.fullmatch(r"cuda(:\d+)?", d):
        if not torch.cuda.is_available():
            raise RcompError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        idx = int(d.split(":")[1]) if ":" in d else 0
        if idx >= torch.cuda.device_count():
            raise RcompError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
        return d
    raise RcompError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def default_output(inp: Path, suffix: str) -> Path:
    """``model.safetensors`` + ``prune0.5`` -> ``model.prune0.5.safetensors`` beside the input."""
    name = inp.name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else inp.stem
    return inp.with_name(f"{stem}.{suffix}.safetensors")


def resolve_output(output: Path | None, inp: Path | None, suffix: str, force: bool) -> Path:
    """The output path (given, or beside the input), checked before any work is done."""
    from rcomp.io.atomic import check_output_path

    if output is None:
        if inp is None:
            raise RcompError("give an output path with -o")
        output = default_output(inp, suffix)
    return check_output_path(Path(output), (inp,) if inp is not None else (), force=force)


def split_input(item: Any, onnx: bool = False) -> tuple[Path | None, Any]:
    """A stage's input as ``(path, None)`` for a checkpoint path (checked: :func:`check_input`) or
    ``(None, model)`` for a model already loaded (the Python API)."""
    if isinstance(item, (str, Path)):
        return check_input(Path(item), onnx=onnx), None
    return None, item


def input_files(path: Path | None, model: Any = None) -> tuple[Path, ...]:
    """The files an output must not overwrite: the input path, or the file a loaded model still is."""
    src = path if path is not None else getattr(model, "source_path", None)
    return (Path(src),) if src is not None else ()


def plan_output(output: Path | None, path: Path | None, suffix: str, force: bool, *, model: Any = None,
                default: bool = True) -> Path | None:
    """The checkpoint a stage will write, checked before any work: ``output``, else (the command line:
    ``default``) ``suffix`` beside the input; None when nothing is to be written (the Python API without
    ``output=``)."""
    from rcomp.io.atomic import check_output_path

    if output is None:
        if not default:
            return None
        if path is None:
            raise RcompError("give an output path with -o")
        output = default_output(path, suffix)
    return check_output_path(Path(output), input_files(path, model), force=force)


def publish(res: StageResult, out: Path | None, force: bool, inputs: tuple) -> StageResult:
    """Write ``res.model`` to ``out`` (atomic, exclusive unless ``force``; never over an input) and put
    the path and sha256 first in the report; without ``out`` they are None (nothing written)."""
    if out is not None:
        res.sha256 = save_output(res.model, out, force, inputs)
        res.output = out
    res.report = {"path": str(out) if out is not None else None, "sha256": res.sha256, **res.report}
    return res


def check_input(path: Path, onnx: bool = False) -> Path:
    """Refuse an input that is not an rcomp checkpoint before anything else (e.g. a PyTorch file that
    needs ``rcomp convert``), so the user hears about the real problem first. ``onnx``: the command
    also takes ONNX files written by ``rcomp export`` (attack, bench, quantize)."""
    from rcomp.io.header import read_header

    if str(path).lower().endswith(".onnx"):
        if not onnx:
            from rcomp.text import printable

            raise RcompError(f"{printable(str(path))} is named as an ONNX file (.onnx); this command works on rcomp "
                             "checkpoints (.safetensors): run it on the checkpoint the file was exported from, then "
                             "export again")
        from rcomp.io.bounded import check_regular

        check_regular(Path(path), "ONNX file")
        return Path(path)
    read_header(Path(path))
    return Path(path)


def check_source(stage_module: Any, cfg: Any, path: Path) -> None:
    """Refuse, from the checkpoint's header alone (no torch, nothing loaded), a combination of options and
    model kind the stage does not support: ``stage_module.check_source(cfg, meta, tensor_names, where)``
    where the stage defines one."""
    check = getattr(stage_module, "check_source", None)
    if check is None:
        return
    from rcomp.io.format import CheckpointMeta
    from rcomp.io.header import read_header

    header = read_header(Path(path))
    check(cfg, CheckpointMeta.from_metadata(header.metadata, where=str(path)), tuple(header.tensors), str(path))


def quant_text(meta) -> str | None:
    """'int8' or 'simulated int4' for a quantized checkpoint's metadata (the mode's ``what`` in the
    quantization catalogue), else None."""
    from rcomp.quant.catalog import MODES

    q = meta.compression.get("quantization") if isinstance(meta.compression, dict) else None
    if not q:
        return None
    entry = MODES.builtin.get(q.get("mode")) if isinstance(q, dict) else None
    if entry is None:
        return "quantized"
    return entry.get("what").format(bits=q.get("bits"))


def check_data(data: str | None, data_dir: Path | None) -> None:
    """Config-time check of ``--data``/``--data-dir`` (no torch): see :func:`rcomp.data.registry.check_data`."""
    if data:
        from rcomp.data.registry import check_data as check

        check(data, data_dir)


def recorded_dataset(item: Any) -> str | None:
    """The dataset a checkpoint (path: read from its header, no torch) or a loaded model records."""
    if isinstance(item, (str, Path)):
        from rcomp.io.format import CheckpointMeta
        from rcomp.io.header import read_header

        return CheckpointMeta.from_metadata(read_header(Path(item)).metadata, where=str(item)).dataset
    meta = getattr(item, "meta", None)
    return getattr(meta, "dataset", None)


def resolve_data(given: str | None, recorded: str | None, source: str, data_dir: Path | None = None,
                 log: Log = stderr_log, why: str = "") -> str:
    """The one rule for ``--data``: given, else the dataset the checkpoint records (said on stderr),
    else a refusal. ``why`` says what needs the data (e.g. ``--method taylor``)."""
    if given:
        return given
    if recorded:
        check_data(recorded, data_dir)
        log(f"data: {recorded} (recorded in {source}; --data overrides)")
        return recorded
    need = f"{why} needs data: " if why else ""
    raise RcompError(f"{need}{source} records no dataset; give --data NAME (e.g. --data digits)")


def load_model(path: Path, device: str = "cpu", arch: str | None = None, trust: bool = False,
               surrogate: Path | None = None):
    """A checkpoint as a Classifier, or an ONNX file as an :class:`~rcomp.onnx.runtime.OnnxClassifier`
    (its gradient surrogate: ``surrogate``, or the source checkpoint it records; which one is said when a
    gradient attack runs: :func:`check_gradients`)."""
    from rcomp.models.loading import load

    if str(path).lower().endswith(".onnx"):
        from rcomp.onnx.runtime import load_onnx

        return load_onnx(path, device, surrogate=surrogate)
    if surrogate is not None:
        raise RcompError("--surrogate is for ONNX models (they have no gradients); a checkpoint is attacked with "
                         "its own gradients, so drop --surrogate")
    return load(path, device=device, factory=arch, trust_factory=trust)


def as_model(model_or_path: Any, device: str = "cpu", arch: str | None = None, trust: bool = False,
             surrogate: Path | None = None):
    """A loaded model, given one or a checkpoint (or ONNX file) path."""
    if isinstance(model_or_path, (str, Path)):
        return load_model(Path(model_or_path), device, arch, trust, surrogate)
    return model_or_path


def check_gradients(model, attacks: dict, name: str, log: Log | None = None) -> None:
    """Refuse gradient attacks on an ONNX model without a gradient surrogate, before anything runs."""
    if not getattr(model, "is_onnx", False):
        return
    from rcomp.onnx.runtime import refuse_gradient_attacks

    refuse_gradient_attacks(model, attacks, name, log)
def copy_model(model):
    """A deep copy of ``model`` (weights, meta and history, gradient twin): what a stage operates on, so the
    caller's model is never changed (Python API: ``p = rcomp.prune(m)`` leaves ``m`` as it was)."""
    import copy

    return copy.deepcopy(model)


def derived(model):
    """Mark ``model`` as made in memory by a stage: it is no longer the file it was loaded from."""
    model.source_path = None
    model.source_sha256 = None
    return model


def record(model, command: str, params: dict[str, Any], input_sha256: str | None,
           metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append the stage's history entry to the model's provenance and return it."""
    from rcomp.io.format import history_entry

    entry = history_entry(command, params, input_sha256, metrics)
    model.meta.history.append(entry)
    return entry


def save_output(model, out: Path, force: bool, inputs: tuple) -> str:
    from rcomp.models.loading import save

    return save(model, out, force=force, inputs=tuple(i for i in inputs if i is not None))


def parameters(model) -> int:
    """Parameters of ``model``, counting an int8 model's packed weights (which are no nn.Parameters)."""
    from rcomp.evaluation.cost import count_params

    return count_params(model)


def human(n: int | None, unit: str = "") -> str:
    """``2800000`` -> ``2.80M``."""
    if n is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n}{unit}"


def require_records(cfg: Any, dist: Any) -> None:
    """An evaluation split over processes (torchrun, or a recipe's ``dist``) needs ``--records DIR``."""
    from rcomp.train import distributed as D

    if (dist.enabled if dist is not None else D.launched()) and cfg.records is None:
        raise RcompError("under torchrun, give --records DIR (a folder every process can reach): the processes "
                         "hand their results to rank 0 through it")
