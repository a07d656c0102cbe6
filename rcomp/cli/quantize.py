"""``rcomp quantize``: post-training quantization to real int8 or simulated 2..16 bits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcomp.cli.common import (
    ArchOpt,
    CkptArg,
    ConfigOpt,
    DataDirOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    SeedOpt,
    TrustOpt,
    emit_json,
    emit_path,
    input_checkpoint,
    load_model,
    log,
    positive_int,
    resolve_output,
    seed_everything,
)


def quantize(
    ckpt: CkptArg = None,
    bits: Annotated[str, typer.Option("--bits", help="Bits: 8 for real int8; 2..16 with --simulate.")] = "8",
    simulate: Annotated[bool, typer.Option("--simulate", help="Fake-quant model (fp32 compute carrying the "
                                                              "rounding of --bits) instead of real int8.")] = False,
    backend: Annotated[str, typer.Option("--backend", help="Quantized engine: x86, fbgemm or qnnpack.")] = "x86",
    data: Annotated[str | None, typer.Option("--data", help="Calibration dataset (default: the checkpoint's "
                                                            "dataset, else digits).", show_default=False)] = None,
    data_dir: DataDirOpt = None,
    calib_n: Annotated[int, typer.Option("--calib-n", help="Calibration images (from the train split).")] = 256,
    eval_n: Annotated[int, typer.Option("--eval-n", help="Test images to report accuracy on (0: skip).")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size for calibration and evaluation.")] = 64,
    seed: SeedOpt = 0,
    output: OutputOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    arch: ArchOpt = None,
    trust_factory: TrustOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Quantize a checkpoint: real int8 (default) or a simulated low-bit fake-quant model.

    Real int8 is static post-training quantization with torch.ao FX (CPU kernels of --backend):
    weights symmetric per output channel, activations affine per tensor, MinMax ranges from
    --calib-n training images, BatchNorm folded. The file is about 4x smaller and, at batch 64,
    several times faster. Attacks on an int8 model take gradients from its fake-quant twin
    (straight-through) and measure accuracy on the real int8 forward pass.

    --simulate --bits 2..16 makes a fake-quant model as in Thorsteinsson et al. (2024): fp32
    compute with the rounding of the low-bit model, differentiable, for studying int16..int2.

    The output stores only plain tensors (integer weights, scales, zero points, ranges) and
    reloads to identical outputs. Pruned checkpoints quantize too. Prints the output path.

    Examples:

    \b
      rcomp quantize model.safetensors --data digits -o model.int8.safetensors
      rcomp quantize model.safetensors --simulate --bits 4 --data digits
      rcomp prune model.safetensors --ratio 0.5 | rcomp quantize --data digits
    """
    import torch

    from rcomp.data.registry import check_fits, get_dataset, make_loader
    from rcomp.io.checkpoint import save
    from rcomp.io.format import history_entry
    from rcomp.quant.backend import check_backend, silenced
    from rcomp.quant.ptq import check_bits
    from rcomp.quant.ptq import quantize as ptq

    b = check_bits(bits, simulate)
    check_backend(backend)
    positive_int(calib_n, "--calib-n")
    positive_int(batch_size, "--batch-size")
    if eval_n < 0:
        from rcomp.errors import RcompError

        raise RcompError(f"--eval-n must be 0 or more, got {eval_n}")
    path = input_checkpoint(ckpt)
    suffix = f"sim{b}" if simulate else "int8"
    out = resolve_output(output, path, suffix, force)
    seed_everything(seed)
    model = load_model(path, "cpu", arch, trust_factory)
    if model.is_quantized:
        from rcomp.errors import RcompError

        raise RcompError(f"{path} is already quantized; quantize the float checkpoint it was made from")
    data_name = data or model.meta.dataset or "digits"
    train = get_dataset(data_name, "train", model.meta.input, data_dir, seed=seed)
    check_fits(train, model.meta.num_classes, data_name)
    calib = [x for x, _ in make_loader(train, batch_size, shuffle=True, seed=seed, n=calib_n)]
    log(f"calibrating on {sum(len(x) for x in calib)} {data_name} images ...")
    qmodel = ptq(model, calib, bits=b, simulate=simulate, backend=backend)

    metrics: dict = {}
    if eval_n:
        test = get_dataset(data_name, "test", model.meta.input, data_dir, seed=seed)
        loader = make_loader(test, batch_size, n=eval_n)
        correct = {"float": 0, "quantized": 0}
        n = 0
        with torch.no_grad(), silenced():
            for x, y in loader:
                correct["float"] += (model(x).argmax(1) == y).sum().item()
                correct["quantized"] += (qmodel(x).argmax(1) == y).sum().item()
                n += len(y)
        metrics = {"accuracy_float": correct["float"] / n, "accuracy": correct["quantized"] / n, "eval_n": n}
        log(f"{data_name} test accuracy ({n} images): float {metrics['accuracy_float']:.4f} -> "
            f"{'int8' if not simulate else f'simulated int{b}'} {metrics['accuracy']:.4f}")
    q = qmodel.meta.compression["quantization"]
    params = {"bits": b, "simulate": simulate, "backend": backend, "data": data_name, "calib_n": q["calib_n"],
              "seed": seed}
    qmodel.meta.history.append(history_entry("quantize", params, model.source_sha256, metrics))
    sha = save(qmodel, out, force=force, inputs=(path,))
    size_in, size_out = Path(path).stat().st_size, Path(out).stat().st_size
    log(f"quantized {path} -> {out} ({q['mode']}, {b} bits, {backend}; {size_in:,} -> {size_out:,} bytes, "
        f"sha256 {sha[:12]})")
    if json_out:
        emit_json({"path": str(out), "sha256": sha, "quantization": q, "size_bytes": size_out,
                   "input_size_bytes": size_in, **metrics})
    else:
        emit_path(out)
