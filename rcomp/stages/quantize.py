"""The quantize stage: post-training quantization to real int8 or simulated 2..16 bits."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcomp import options as O
from rcomp.errors import RcompError
from rcomp.quant import catalog as qc
from rcomp.stages import common as C
from rcomp.text import printable

SUPPORTED = f"supported: {qc.supported()}"

SUMMARY = "Quantize a checkpoint: real int8 (default) or a simulated low-bit fake-quant model."
DOC = """Real int8 is static post-training quantization (torch.ao FX calibration; run on oneDNN's int8
kernels by default (pt2e), or on torch.ao's deprecated engines with --backend x86|fbgemm|qnnpack):
weights symmetric per output channel, activations affine per tensor, MinMax ranges from
--calib-n training images, BatchNorm folded. The file is about 4x smaller and, at batch 64,
several times faster. Attacks on an int8 model take gradients from its fake-quant twin
(straight-through) and measure accuracy on the real int8 forward pass.

--simulate --bits 2..16 makes a fake-quant model as in Thorsteinsson et al. (2024): fp32
compute with the rounding of the low-bit model, differentiable, for studying int16..int2.

The output stores only plain tensors (integer weights, scales, zero points, ranges) and
reloads to identical outputs. Pruned checkpoints quantize too. Prints the output path."""
EXAMPLES = """rcomp quantize model.safetensors --data digits -o model.int8.safetensors
rcomp quantize model.safetensors --simulate --bits 4 --data digits
rcomp quantize old.int8.safetensors --backend pt2e -o model.pt2e.safetensors   # a torch.ao int8 file to pt2e
rcomp prune model.safetensors --ratio 0.5 | rcomp quantize --data digits
rcomp quantize model.onnx --backend onnxruntime --data digits -o model.int8.onnx"""


@dataclass
class Config:
    bits: int = O.opt(8, "--bits", kind="int", min=2, max=16, hint=SUPPORTED,
                      help="Bits: 8 for real int8; 2..16 with --simulate.")
    simulate: bool = O.opt(False, "--simulate", kind="bool",
                         help="Fake-quant model (fp32 compute carrying the rounding of --bits) instead of real int8.")
    backend: str | None = O.opt(None, "--backend", kind="choice", choices=qc.QUANTIZE_BACKENDS,
                       help="Int8 runtime. Default: pt2e, the pt2e int8 graph on oneDNN's int8 kernels (torch's "
                            "own; x86 for --simulate, and where pt2e cannot take the network, said on stderr). "
                            "x86, fbgemm or qnnpack: torch.ao's engines (deprecated upstream; same file layout, "
                            "see docs/quantization.md); onnxruntime: static QDQ int8 of an ONNX file (a "
                            "checkpoint is exported first), written as .onnx.")
    data: str | None = O.opt(None, "--data", help="Calibration dataset (default: the dataset the checkpoint records; "
                                                "required when it records none).")
    data_dir: Path | None = O.data_dir_opt()
    calib_n: int = O.opt(256, "--calib-n", kind="int", min=1, max=10**6,
                       help="Calibration images (from the train split).")
    eval_n: int = O.opt(1000, "--eval-n", kind="int", min=0, max=10**8,
                      help="Test images to report accuracy on (0: skip).")
    batch_size: int = O.batch_opt(64, "Batch size for calibration and evaluation.")
    seed: int = O.seed_opt()
    output: Path | None = O.output_opt()
    force: bool = O.force_opt()
    json: bool = O.json_opt()
    arch: str | None = C.arch_opt()
    trust_factory: bool = O.trust_opt()

    def check(self) -> None:
        if self.bits not in qc.bits_of(qc.mode_for(self.simulate)) and not self.simulate:
            raise RcompError(f"--bits {self.bits} is not supported without --simulate (add --simulate for a "
                             f"fake-quant model); {SUPPORTED}")
        if self.backend in qc.BACKENDS and qc.runtime(self.backend) == qc.PT2E:
            if self.simulate:
                raise RcompError("--backend pt2e makes real int8 models only; drop --simulate, or simulate with "
                                 "--backend x86")
            from rcomp.quant.pt2e import require_onednn

            require_onednn()
        if self.backend == qc.ONNXRUNTIME:
            from rcomp.stages.export import check_onnx_output

            check_onnx_output(self.output)
        C.check_data(self.data, self.data_dir)

    @property
    def suffix(self) -> str:
        return qc.MODES.get(qc.mode_for(self.simulate)).get("suffix").format(bits=self.bits)


def _torch_ao_int8(meta) -> str | None:
    """The backend of a real int8 checkpoint that runs on torch.ao's engines, else None."""
    q = meta.compression.get("quantization") if isinstance(meta.compression, dict) else None
    if not isinstance(q, dict) or not qc.is_real(q) or q.get("backend") not in qc.BACKENDS:
        return None
    return q["backend"] if qc.runtime(q["backend"]) == qc.TORCH_AO else None


def moves_to_pt2e(cfg: Config, meta) -> str | None:
    """The torch.ao backend of a real int8 checkpoint that ``--backend pt2e`` moves to the pt2e runtime (the
    same fake-quant twin, integer weights and ranges: no calibration), else None."""
    if cfg.simulate or cfg.backend not in qc.BACKENDS or qc.runtime(cfg.backend) != qc.PT2E:
        return None
    return _torch_ao_int8(meta)


def check_source(cfg: Config, meta, tensors: tuple[str, ...], where: str) -> None:
    """Quantizing works on float models only, but for moving a torch.ao int8 file to pt2e (``--backend pt2e``);
    the header says whether this one already is quantized."""
    q = C.quant_text(meta)
    if q and moves_to_pt2e(cfg, meta):
        return
    if q:
        move = (" (a torch.ao int8 file moves to the maintained pt2e runtime with --backend pt2e)"
                if _torch_ao_int8(meta) else "")
        raise RcompError(f"{where} is already quantized ({q}); quantize the float checkpoint it was made from, or "
                         f"fine-tune this one as it is (rcomp finetune keeps its format){move}")
    C.resolve_data(cfg.data, meta.dataset, where, cfg.data_dir, log=_no_log, why="calibration")  # before loading


def _move_to_pt2e(model, old: str, cfg: Config, log, source: str) -> C.StageResult:
    """A torch.ao int8 model on the pt2e runtime (``rcomp.quant.assemble.with_backend``): the same twin, hence the
    same integer weights and ranges; no calibration data. With data at hand (``--data`` or the recorded dataset)
    and ``--eval-n``, the accuracy on both runtimes and their top-1 agreement are reported."""
    from rcomp.quant.assemble import with_backend

    qmodel = with_backend(model, cfg.backend)  # refuses a move the kernels cannot take, before anything is said
    if cfg.calib_n != Config.__dataclass_fields__["calib_n"].default:
        log(f"--calib-n {cfg.calib_n} is not used: the move keeps the file's calibrated ranges")
    log(f"{printable(Path(source).name)} runs on torch.ao's {old} int8 engine (deprecated upstream): moving it to "
        "pt2e (oneDNN's int8 kernels) with the same integer weights and ranges; no calibration")
    metrics: dict[str, Any] = {}
    data_name = cfg.data or model.meta.dataset
    if cfg.eval_n and data_name:
        metrics = _agreement(model, qmodel, cfg, data_name, log)
    elif cfg.eval_n:
        log("no dataset recorded and no --data: the two runtimes are not compared (give --data to compare them)")
    q = qmodel.meta.compression["quantization"]
    params = {"bits": 8, "simulate": False, "backend": cfg.backend, "from_backend": old, "calibrated": False,
              "data": data_name if metrics else None, "seed": cfg.seed}
    entry = C.record(qmodel, "quantize", params, getattr(model, "source_sha256", None), metrics)
    return C.StageResult(model=C.derived(qmodel), report={"quantization": q, **metrics}, entry=entry)


def _agreement(model, qmodel, cfg: Config, data_name: str, log) -> dict[str, Any]:
    import torch

    from rcomp.data.subset import points_text
    from rcomp.quant.backend import silenced

    loader = _test_loader(model, cfg, data_name, log)
    n = same = right_old = right_new = 0
    with silenced(), torch.no_grad():
        for x, y in loader:
            a, b = model(x).argmax(1), qmodel(x).argmax(1)
            n += len(y)
            same += int((a == b).sum())
            right_old += int((a == y).sum())
            right_new += int((b == y).sum())
    log(f"{data_name} test accuracy ({points_text(loader.points)}): torch.ao int8 {right_old / n:.4f} -> pt2e int8 "
        f"{right_new / n:.4f}, top-1 agreement {same / n:.4f}")
    return {"accuracy_torch_ao": right_old / n, "accuracy": right_new / n, "top1_agreement": same / n, "eval_n": n,
            "eval_points": loader.points}


def _no_log(msg: str) -> None:
    """A header check says nothing: the stage says which data it took when it takes it."""


def _test_loader(model, cfg: Config, data_name: str, log):
    """The ``--eval-n`` test points both models are scored on."""
    from rcomp.data.registry import get_dataset, make_loader

    test = get_dataset(data_name, "test", model.meta.input, cfg.data_dir, seed=cfg.seed, log=log)
    return make_loader(test, cfg.batch_size, n=cfg.eval_n)


def _accuracy(model, qmodel, cfg: Config, data_name: str, log) -> dict[str, Any]:
    from rcomp.data.subset import points_text
    from rcomp.evaluation.accuracy import clean_accuracy
    from rcomp.quant.backend import silenced

    loader = _test_loader(model, cfg, data_name, log)
    with silenced():
        before, n = clean_accuracy(model, loader)
        after, _ = clean_accuracy(qmodel, loader)
    metrics = {"accuracy_float": before / n, "accuracy": after / n, "eval_n": n, "eval_points": loader.points}
    what = qc.MODES.get(qc.mode_for(cfg.simulate)).get("what").format(bits=cfg.bits)
    log(f"{data_name} test accuracy ({points_text(loader.points)}): float {before / n:.4f} -> {what} "
        f"{after / n:.4f}")
    return metrics


def apply(model, cfg: Config, log=C.stderr_log, source: str = "model") -> C.StageResult:
    """A quantized copy of ``model`` (calibrated on its dataset; ``model`` is left unchanged) with the
    history entry recorded on it."""
    from rcomp.data.registry import check_fits, get_dataset, make_loader
    from rcomp.quant.ptq import quantize as ptq
    from rcomp.quant.ptq import trace

    old_backend = moves_to_pt2e(cfg, model.meta)
    if old_backend is not None:
        return _move_to_pt2e(model, old_backend, cfg, log, source)
    check_source(cfg, model.meta, (), source)
    if model.is_quantized:
        raise RcompError(f"{source} is already quantized; quantize the float checkpoint it was made from")
    folded = trace(model)  # a network torch.fx cannot trace is refused now, before the data is loaded
    data_name = C.resolve_data(cfg.data, model.meta.dataset, source, cfg.data_dir, log, why="calibration")
    train = get_dataset(data_name, "train", model.meta.input, cfg.data_dir, seed=cfg.seed, log=log)
    check_fits(train, model.meta.num_classes, data_name)
    calib = [x for x, _ in make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed, n=cfg.calib_n)]
    seen = sum(len(x) for x in calib)
    more = f" (all of its training split: --calib-n {cfg.calib_n} asked for more)" if cfg.calib_n > seen else ""
    log(f"calibrating on {seen} {data_name} images{more} ...")
    qmodel = ptq(model, calib, bits=cfg.bits, simulate=cfg.simulate, backend=cfg.backend, folded=folded, log=log)
    metrics = _accuracy(model, qmodel, cfg, data_name, log) if cfg.eval_n else {}
    q = qmodel.meta.compression["quantization"]
    params = {"bits": cfg.bits, "simulate": cfg.simulate, "backend": q["backend"], "data": data_name,
              "calib_n": q["calib_n"], "seed": cfg.seed}
    entry = C.record(qmodel, "quantize", params, getattr(model, "source_sha256", None), metrics)
    return C.StageResult(model=C.derived(qmodel), report={"quantization": q, **metrics}, entry=entry)


def run(cfg: Config, inputs: list, *, log=C.stderr_log, default_output: bool = True, **_: Any) -> C.StageResult:
    """Load -> quantize -> record -> save. ``inputs[0]`` is a checkpoint (or ONNX) path or a loaded model
    (left as it was); without ``cfg.output`` the output goes beside the input, or
    (``default_output=False``, the Python API) nothing is written."""
    path, given = C.split_input(inputs[0], onnx=True)
    onnx_in = path is not None and str(path).lower().endswith(".onnx")
    if path is not None and not onnx_in:
        C.check_source(sys.modules[__name__], cfg, path)  # from the header: before loading, or exporting
    if cfg.backend == qc.ONNXRUNTIME or onnx_in:
        if cfg.backend != qc.ONNXRUNTIME:
            raise RcompError(f"{path.name} is an ONNX file: quantize it with --backend onnxruntime")
        if path is None:
            raise RcompError("--backend onnxruntime quantizes a file: give the checkpoint's path, not a loaded model")
        from rcomp.stages.export import quantize_onnx

        return quantize_onnx(cfg, path, log, default_output=default_output)
    suffix = "pt2e" if _moves(cfg, path, given) else cfg.suffix
    out = C.plan_output(cfg.output, path, suffix, cfg.force, model=given, default=default_output)
    C.seed_everything(cfg.seed)
    model = given if given is not None else C.as_model(path, "cpu", cfg.arch, cfg.trust_factory)
    res = apply(model, cfg, log, source=str(path) if path is not None else "model")
    q = res.report.pop("quantization")
    C.publish(res, out, cfg.force, C.input_files(path, given))
    src = C.input_files(path, given)
    size_in = src[0].stat().st_size if src else None
    size_out = out.stat().st_size if out is not None else None
    if out is not None:
        sizes = f"{size_in:,} -> {size_out:,}" if size_in is not None else f"{size_out:,}"
        log(f"quantized {src[0] if src else 'the model'} -> {out} ({q['mode']}, {q['bits']} bits, {q['backend']}; "
            f"{sizes} bytes, sha256 {res.sha256[:12]})")
    res.report = {"path": res.report.pop("path"), "sha256": res.report.pop("sha256"), "quantization": q,
                  "size_bytes": size_out, "input_size_bytes": size_in, **res.report}
    return res


def _moves(cfg: Config, path: Path | None, given) -> bool:
    """Whether this run moves a torch.ao int8 model to pt2e (from the header, or the loaded model's meta)."""
    if given is not None:
        return moves_to_pt2e(cfg, given.meta) is not None
    if path is None:
        return False
    from rcomp.io.format import CheckpointMeta
    from rcomp.io.header import read_header

    return moves_to_pt2e(cfg, CheckpointMeta.from_metadata(read_header(Path(path)).metadata, where=str(path))) \
        is not None
