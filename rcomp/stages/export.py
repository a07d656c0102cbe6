"""The export stage: a checkpoint -> an ONNX file, published only if ONNX Runtime reproduces the model.

Also home of ``rcomp quantize --backend onnxruntime`` (:func:`quantize_onnx`), which the quantize
stage hands ONNX work to, so that everything ONNX stays out of the torch.ao path.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcomp import options as O
from rcomp.errors import RcompError, ThresholdError
from rcomp.stages import common as C
from rcomp.text import printable

EXPORTERS = ("dynamo", "legacy")  # rcomp.onnx.export.EXPORTERS

SUMMARY = "Export a checkpoint to ONNX (dense, pruned or simulated-quantized), checked against ONNX Runtime."
DOC = """Writes an ONNX file (opset 18, dynamic batch axis; input 'images' (N, C, H, W) in [0, 1] with
the normalisation inside the graph, output 'logits') that holds rcomp's metadata in its
metadata_props: input spec, classes, compression, history and the path and sha256 of the
source checkpoint.

Before anything is written, ONNX Runtime runs the file on held-out images -- the test split
of --data, else of the dataset the checkpoint records, else seeded random [0, 1] inputs (said
on stderr) -- against rcomp's model: the max abs logit difference and the top-1 agreement are
printed and stored. Below --min-agreement (99%) it exits 1 and writes nothing.

torch.ao int8 checkpoints are refused (their export is not faithful): export the float
checkpoint and quantize the ONNX file with rcomp quantize --backend onnxruntime. Needs the
ONNX extra: pip install 'rcomp[onnx]'. Prints the output path."""
EXAMPLES = """rcomp export model.safetensors -o model.onnx
rcomp export pruned.safetensors --data digits -o pruned.onnx
rcomp export model.safetensors --exporter legacy --json
rcomp quantize model.onnx --backend onnxruntime --data digits -o model.int8.onnx
rcomp bench model.safetensors model.onnx model.int8.onnx --data digits --attack square --eps 0.1"""


@dataclass
class Config:
    output: Path | None = O.output_opt("Output .onnx path (default: next to the input, model.onnx).")
    data: str | None = O.data_opt(help="Held-out images for the parity check: the dataset's test split (default: the "
                                       "dataset the checkpoint records; without one, seeded random inputs).")
    data_dir: Path | None = O.data_dir_opt()
    parity_n: int = O.opt(256, "--parity-n", kind="int", min=1, max=10**6,
                          help="Images the parity check compares ONNX Runtime and rcomp's model on.")
    min_agreement: float = O.opt(0.99, "--min-agreement", kind="number", min=0, max=1,
                                 help="Refuse (exit 1, nothing written) below this top-1 agreement.")
    exporter: str = O.opt("dynamo", "--exporter", kind="choice", choices=EXPORTERS,
                          help="dynamo (torch.export-based, maintained; slower) or legacy (TorchScript-based, "
                               "deprecated by torch; 5-15x faster here).")
    opset: int = O.opt(18, "--opset", kind="int", min=17, max=21, help="ONNX opset version.")
    batch_size: int = O.batch_opt(128, "Batch size of the parity check.")
    seed: int = O.seed_opt()
    force: bool = O.force_opt()
    json: bool = O.json_opt()
    arch: str | None = C.arch_opt()
    trust_factory: bool = O.trust_opt()

    def check(self) -> None:
        check_onnx_output(self.output)


def check_onnx_output(output: Path | None) -> None:
    """A given output of a command that writes ONNX ends in .onnx (said before any work, also in a recipe)."""
    if output is not None and not Path(output).name.lower().endswith(".onnx"):
        raise RcompError(f"output {printable(str(output))} must end in .onnx (this command writes an ONNX file)")


def onnx_output(output: Path | None, inp: Path | None, suffix: str, force: bool, model: Any = None) -> Path:
    """The ``.onnx`` output: given, or ``model[.suffix].onnx`` beside the input; checked before any work
    (never the input, nor the file a loaded ``model`` still is)."""
    from rcomp.io.atomic import check_output_path

    if output is None:
        if inp is None:
            raise RcompError("give an output path with -o")
        name = inp.name
        stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else \
            name[: -len(".onnx")] if name.lower().endswith(".onnx") else inp.stem
        output = inp.with_name(f"{stem}{'.' + suffix if suffix else ''}.onnx")
    output = Path(output)
    check_onnx_output(output)
    return check_output_path(output, C.input_files(inp, model), force=force)


def export_bytes(model, cfg: Config, source: Path | None, log=C.stderr_log) -> tuple[bytes, dict[str, Any]]:
    """ONNX bytes of ``model`` with rcomp's metadata, after the parity check; ``(bytes, report)``.
    ``source``: the checkpoint file ``model`` is (None for a model made in memory: no source is recorded).

    Raises :class:`~rcomp.errors.ThresholdError` (exit 1) when the agreement is below
    ``cfg.min_agreement``: nothing may be written then."""
    from rcomp.evaluation.cost import count_macs
    from rcomp.io.header import sha256_file
    from rcomp.onnx import export as E
    from rcomp.onnx.runtime import OnnxClassifier

    name = printable(source.name) if source is not None else "the model"
    refuse_real_int8(model.meta, name)
    import time

    t0 = time.perf_counter()
    raw = E.to_onnx(model, cfg.exporter, cfg.opset)
    seconds = time.perf_counter() - t0
    log(f"exported {name} with the {cfg.exporter} exporter, opset {cfg.opset}, dynamic batch axis "
        f"({seconds:.1f} s)")
    batches, desc = E.parity_inputs(model, cfg.data, cfg.data_dir, cfg.parity_n, cfg.batch_size, cfg.seed, log)
    meta = copy.deepcopy(model.meta)
    probe = OnnxClassifier(raw, meta, {}, where="the exported model")
    par = E.parity(model, probe, batches)
    par["inputs"] = desc
    log(f"parity (ONNX Runtime vs rcomp): max abs diff {par['max_abs_diff']:.3g}, top-1 agreement "
        f"{100 * par['top1_agreement']:.2f}% on {par['n']} inputs")
    if par["top1_agreement"] < cfg.min_agreement:
        raise ThresholdError(f"the exported model agrees with {name} on only "
                             f"{100 * par['top1_agreement']:.2f}% of {par['n']} inputs (max abs diff "
                             f"{par['max_abs_diff']:.3g}), below --min-agreement {cfg.min_agreement:g}; nothing was "
                             f"written (try --exporter {'legacy' if cfg.exporter == 'dynamo' else 'dynamo'})")
    sha = getattr(model, "source_sha256", None) or (sha256_file(source) if source is not None else None)
    params = {"exporter": cfg.exporter, "opset": cfg.opset, "data": cfg.data or model.meta.dataset,
              "parity_n": par["n"], "seed": cfg.seed}
    entry = C.record(model, "export", params, sha, {k: v for k, v in par.items() if k != "inputs"})
    meta = copy.deepcopy(model.meta)
    try:
        meta.stats["macs"] = count_macs(model, tuple(model.meta.input.shape))
    except Exception:  # noqa: BLE001 - a model the counter cannot run keeps its other figures
        pass
    src = {"path": str(Path(source).resolve()), "sha256": sha, "size_bytes": Path(source).stat().st_size} \
        if source is not None else None
    info = {"source": src,
            "exporter": cfg.exporter,
            "opset": cfg.opset, "input": E.INPUT_NAME, "output": E.OUTPUT_NAME, "parity": par}
    data = E.with_metadata(raw, E.metadata_props(meta, info))
    report = {"exporter": cfg.exporter, "opset": cfg.opset, "export_seconds": round(seconds, 2), "parity": par,
              "source": info["source"], "entry": entry}
    return data, report


def refuse_real_int8(meta, name: str) -> None:
    """A model on real integer kernels (torch.ao int8) cannot be exported faithfully: refused with the way
    round (:data:`rcomp.onnx.export.INT8_REFUSAL`)."""
    from rcomp.quant.catalog import BACKEND_INFO, TORCH_AO, is_real

    q = meta.compression.get("quantization") if isinstance(meta.compression, dict) else None
    if isinstance(q, dict) and is_real(q):
        from rcomp.onnx.export import INT8_REFUSAL, INT8_WHY

        runtime = BACKEND_INFO.get(q.get("backend"), (None, None, TORCH_AO))[2]
        raise RcompError(INT8_REFUSAL.format(name=name, why=INT8_WHY.get(runtime, INT8_WHY[TORCH_AO])))


def check_source(cfg: Config, meta, tensors: tuple, where: str) -> None:
    """A torch.ao int8 checkpoint is refused from its header, before it is loaded."""
    refuse_real_int8(meta, printable(Path(where).name))


def run(cfg: Config, inputs: list, *, log=C.stderr_log, default_output: bool = True, **_: Any) -> C.StageResult:
    """Load -> export -> parity check -> record -> write (atomically, only if the parity check passed).
    ``inputs[0]`` is a checkpoint path or a loaded model (left as it was); without ``cfg.output`` the file
    goes beside the input, or (``default_output=False``, the Python API) only the check runs."""
    import hashlib

    from rcomp.io.atomic import atomic_write_bytes
    from rcomp.onnx.deps import require

    path, given = C.split_input(inputs[0])
    if path is not None:
        C.check_source(sys.modules[__name__], cfg, path)
    out = onnx_output(cfg.output, path, "", cfg.force, model=given) \
        if cfg.output is not None or default_output else None
    require("rcomp export", ("onnx", "onnxruntime", "onnxscript") if cfg.exporter == "dynamo"
            else ("onnx", "onnxruntime"))
    C.seed_everything(cfg.seed)
    model = C.copy_model(given) if given is not None else C.as_model(path, "cpu", cfg.arch, cfg.trust_factory)
    source = C.input_files(path, given)
    data, report = export_bytes(model, cfg, source[0] if source else None, log)
    sha = None
    if out is not None:
        atomic_write_bytes(out, data, exclusive=not cfg.force)
        sha = hashlib.sha256(data).hexdigest()
        log(f"wrote {out} ({len(data):,} bytes, sha256 {sha[:12]})")
    entry = report.pop("entry")
    return C.StageResult(output=out, sha256=sha, entry=entry,
                         report={"path": str(out) if out is not None else None, "sha256": sha,
                                 "size_bytes": len(data), **report})


# ----- rcomp quantize --backend onnxruntime ---------------------------------------

def quantize_onnx(cfg, path: Path, log=C.stderr_log, default_output: bool = True) -> C.StageResult:
    """ONNX Runtime static int8 of an ONNX file written by rcomp export, or of a checkpoint (exported
    first with the default exporter, parity-checked, then quantized): ``model[.int8].onnx``
    (``default_output=False``, the Python API: only ``cfg.output``, which it then needs)."""
    import hashlib

    from rcomp.data.registry import check_fits, get_dataset, make_loader
    from rcomp.io.atomic import atomic_write_bytes
    from rcomp.io.header import sha256_file
    from rcomp.onnx import export as E
    from rcomp.onnx import ortquant as Q
    from rcomp.onnx.deps import require
    from rcomp.onnx.runtime import OnnxClassifier, is_onnx_path, load_onnx, read_model

    if cfg.simulate:
        raise RcompError("--backend onnxruntime makes real int8 ONNX files; drop --simulate (simulated models "
                         "use the torch backends)")
    if cfg.output is None and not default_output:
        raise RcompError("--backend onnxruntime writes an ONNX file: give output=PATH.onnx")
    out = onnx_output(cfg.output, path, "int8", cfg.force)
    require("rcomp quantize --backend onnxruntime", ("onnx", "onnxruntime") if is_onnx_path(path)
            else ("onnx", "onnxruntime", "onnxscript"))
    C.seed_everything(cfg.seed)
    if is_onnx_path(path):
        fp32 = load_onnx(path, use_source=False)
        data, _proto, _props = read_model(path)
        info = copy.deepcopy(fp32.onnx_info)
        in_sha = fp32.source_sha256
    else:
        model = C.as_model(path, "cpu", cfg.arch, cfg.trust_factory)
        log(f"{printable(path.name)} is a checkpoint: exporting it to ONNX first (dynamo exporter, parity-checked)")
        ecfg = Config(data=cfg.data, data_dir=cfg.data_dir, seed=cfg.seed)
        data, rep = export_bytes(model, ecfg, path, log)
        _, _, props = _parse(data)
        fp32 = OnnxClassifier(data, copy.deepcopy(model.meta), {}, where="the exported model")
        from rcomp.onnx.runtime import meta_of

        fp32.meta, info = meta_of(props, "the exported model")
        in_sha = sha256_file(path)
    if fp32.is_quantized:
        raise RcompError(f"{printable(path.name)} is already quantized; quantize the float model it was made from")
    name = cfg.data or fp32.meta.dataset
    if not name:
        raise RcompError(f"{printable(str(path))} records no dataset to calibrate on; give --data (e.g. --data digits)")
    if cfg.data is None:
        log(f"calibration data: {name} (recorded in {printable(path.name)}; --data overrides)")
    train = get_dataset(name, "train", fp32.meta.input, cfg.data_dir, seed=cfg.seed, log=log)
    check_fits(train, fp32.meta.num_classes, name)
    calib = [x for x, _ in make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed, n=cfg.calib_n)]
    calib_n = sum(len(x) for x in calib)
    activation, reason = Q.choose_activation()
    log(f"ONNX Runtime int8 (QDQ, per-channel weights): activation type {activation}: {reason}")
    log(f"calibrating on {calib_n} {name} images ...")
    qraw = Q.quantize_static(data, calib, activation)
    left, total = Q.float_layers(qraw)
    if left:
        log(f"{len(left)} of {total} Conv/Gemm/MatMul layers stayed float in the int8 file (onnxruntime's quantizer "
            f"did not take them: {printable(', '.join(left[:3]))}{', ...' if len(left) > 3 else ''}); they run at "
            "fp32 speed")
    q = Q.quant_record(activation, reason, calib_n, name)
    q["float_layers"] = len(left)
    meta = copy.deepcopy(fp32.meta)
    meta.compression["quantization"] = q
    int8 = OnnxClassifier(qraw, copy.deepcopy(meta), {}, where="the quantized model")
    metrics = _figures(fp32, int8, cfg, name, log) if cfg.eval_n else {}
    params = {"backend": "onnxruntime", "activation_type": activation, "data": name, "calib_n": calib_n,
              "seed": cfg.seed}
    from rcomp.io.format import history_entry

    entry = history_entry("quantize", params, in_sha, metrics)
    meta.history.append(entry)
    info["quantized_from"] = {"path": str(Path(path).resolve()), "sha256": in_sha}
    info["quantization_figures"] = metrics
    qdata = E.with_metadata(qraw, E.metadata_props(meta, info))
    atomic_write_bytes(out, qdata, exclusive=not cfg.force)
    sha = hashlib.sha256(qdata).hexdigest()
    size_in = path.stat().st_size
    log(f"quantized {printable(str(path))} -> {out} (onnxruntime QDQ int8, {activation}; {size_in:,} -> "
        f"{len(qdata):,} bytes, sha256 {sha[:12]})")
    return C.StageResult(output=out, sha256=sha, entry=entry,
                         report={"path": str(out), "sha256": sha, "quantization": q, "size_bytes": len(qdata),
                                 "input_size_bytes": size_in, **metrics})


def _parse(data: bytes):
    import onnx

    proto = onnx.load_from_string(data)
    return data, proto, {p.key: p.value for p in proto.metadata_props}


def _figures(fp32, int8, cfg, name: str, log) -> dict[str, Any]:
    """Accuracy before and after, and top-1 agreement, on ``cfg.eval_n`` test images."""
    import torch

    from rcomp.data.registry import get_dataset, make_loader

    test = get_dataset(name, "test", fp32.meta.input, cfg.data_dir, seed=cfg.seed, log=log)
    n = a = b = agree = 0
    with torch.inference_mode():
        for x, y in make_loader(test, cfg.batch_size, n=cfg.eval_n):
            pa, pb = fp32(x).argmax(1), int8(x).argmax(1)
            a += int((pa == y).sum())
            b += int((pb == y).sum())
            agree += int((pa == pb).sum())
            n += len(y)
    m = {"accuracy_float": a / n, "accuracy": b / n, "top1_agreement": agree / n, "eval_n": n}
    log(f"{name} test accuracy ({n} images): ONNX fp32 {a / n:.4f} -> ONNX int8 {b / n:.4f}; top-1 agreement "
        f"{100 * agree / n:.2f}%")
    return m
