"""Does the file you ship behave like the model rcomp measured? ONNX export, ONNX Runtime int8, speed, robustness.

In one run (OMP_WAIT_POLICY=PASSIVE, set before torch loads; 1 thread for torch and ONNX Runtime):

1. parity: resnet18-cifar (seeded init) dense and pruned 0.5 (l1), exported with the dynamo exporter
   (--exporter legacy: faster), ONNX Runtime against rcomp on 3x32x32 digits test images: top-1
   agreement and max abs diff. Target: 100% and < 1e-4.
2. ONNX Runtime int8 accuracy against ONNX fp32 on digits (convnet8 trained 8 epochs) and on an image
   folder (the digits images written as 16x16 PNGs in class folders, convnet8 trained on it).
   Target: within 0.5 points.
3. speed at batch 64 against eager fp32 (resnet18-cifar dense): ORT fp32, ORT int8 (the activation type
   rcomp picks for this CPU, and S8S8), torch.ao int8, pt2e int8 (the default); interleaved rounds, medians
   and spread, CPU named.
   Target: ORT int8 >= 3.5x on AVX2. With it, the ceiling: the best GMAC/s ONNX Runtime's int8
   convolution reaches here on one layer, and the speed-up over this run's eager fp32 rate it allows.
4. robustness at eps 0.1 of the exported int8 file (convnet8 digits): per-example worst of Square on the
   file and PGD/APGD transfer from the source checkpoint (`rcomp attack FILE --attack auto`, gradients
   from the source checkpoint), against `rcomp attack --attack auto` on the int8 checkpoint (pt2e, the default).
   Target: within 1 point, or the difference explained.

--quick: fewer images, rounds and queries. Speed figures from a loaded machine cannot be trusted.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no busy-waiting threads

import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import main, row, setup_threads, train_classifier  # noqa: E402

CMD = "python benchmarks/bench_export.py"


def _cpu() -> str:
    name = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from rcomp.onnx.ortquant import cpu_flags

    f = cpu_flags()
    isa = "AVX512-VNNI" if "avx512_vnni" in f else "AVX-VNNI" if "avx_vnni" in f else \
        "AVX512" if "avx512f" in f else "AVX2" if "avx2" in f else "no AVX2"
    return f"{name} ({isa})"


def _cli(*args) -> tuple[int, str, str]:
    """``rcomp ARGS`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from rcomp.cli import main as rcomp_main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rcomp_main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
    return code, out.getvalue(), err.getvalue()


def _train(arch: str, data: str, shape, path: Path, epochs: int, data_dir=None) -> Path:
    from rcomp.models.loading import save

    save(train_classifier(arch, data, shape, epochs, data_dir), path, force=True)
    return path


def _image_folder(root: Path) -> Path:
    """The digits images as 16x16 greyscale PNGs in train/ and test/ class folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.target))
    for k, i in enumerate(order):
        split = "test" if k < 360 else "train"
        folder = root / split / f"c{d.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        img = (d.images[i] / 16.0 * 255).astype("uint8")
        Image.fromarray(img).resize((16, 16), Image.NEAREST).save(folder / f"{i}.png")
    return root


def _parity(work: Path, quick: bool, exporter: str) -> list[dict]:
    import json

    import torch

    from rcomp.models.loading import save
    from rcomp.models.registry import build_model
    from rcomp.onnx.runtime import read_model

    torch.manual_seed(0)
    dense = work / "r18.safetensors"
    m = build_model("resnet18-cifar", 10, (3, 32, 32), [0.0] * 3, [1.0] * 3, dataset="digits")
    save(m.eval(), dense, force=True)
    pruned = work / "r18.p50.safetensors"
    assert _cli("prune", dense, "--ratio", "0.5", "-o", pruned, "--force")[0] == 0
    rows = []
    for name, src in (("dense", dense), ("pruned 0.5", pruned)):
        out = src.with_suffix(".onnx")
        t0 = time.perf_counter()
        code, _, err = _cli("export", src, "-o", out, "--force", "--exporter", exporter, "--data", "digits",
                            "--parity-n", "128" if quick else "360")
        secs = time.perf_counter() - t0
        if code != 0:
            rows.append(row(f"resnet18-cifar {name}: export", err.strip().splitlines()[-1][:120], "exports", False))
            continue
        par = json.loads(read_model(out)[2]["rcomp.onnx"])["parity"]
        cmd = f"rcomp export {src.name} --exporter {exporter} --data digits"
        rows.append(row(f"resnet18-cifar {name}: top-1 agreement ({par['n']} digits images, {exporter}, "
                        f"{secs:.0f} s)", par["top1_agreement"], "1.0", par["top1_agreement"] == 1.0, cmd))
        rows.append(row(f"resnet18-cifar {name}: max abs logit diff", par["max_abs_diff"], "< 1e-4",
                        par["max_abs_diff"] < 1e-4, cmd))
    return rows


def _int8_accuracy(work: Path, quick: bool) -> tuple[list[dict], Path]:
    import json

    rows = []
    ckpt = _train("convnet8", "digits", (1, 8, 8), work / "c8.safetensors", 4 if quick else 8)
    folder = _image_folder(work / "folder")
    fck = _train("convnet8", "imagefolder", (1, 16, 16), work / "c8f.safetensors", 4 if quick else 8, folder)
    for label, src, data, extra in (("digits", ckpt, "digits", ()),
                                    ("image folder (digits as 16x16 PNGs)", fck, "imagefolder",
                                     ("--data-dir", folder))):
        onnx_path = src.with_suffix(".onnx")
        code, _, err = _cli("export", src, "-o", onnx_path, "--force", "--exporter", "legacy", "--data", data, *extra)
        assert code == 0, err
        code, out, err = _cli("quantize", onnx_path, "--backend", "onnxruntime", "--data", data, "--force", "--json",
                              "-o", src.with_suffix(".int8.onnx"), *extra)
        if code != 0:
            rows.append(row(f"ORT int8 {label}", err.strip().splitlines()[-1][:120], "runs", False))
            continue
        rep = json.loads(out)
        drop = 100 * (rep["accuracy_float"] - rep["accuracy"])
        rows.append(row(f"ORT int8 {label}: accuracy fp32 -> int8 ({rep['eval_n']} test images, "
                        f"{rep['quantization']['activation_type']})",
                        f"{rep['accuracy_float']:.4f} -> {rep['accuracy']:.4f} (agreement "
                        f"{rep['top1_agreement']:.4f})", "drop <= 0.5 points", drop <= 0.5,
                        f"rcomp quantize {onnx_path.name} --backend onnxruntime --data {data}"))
    return rows, ckpt


def _speed(work: Path, quick: bool) -> list[dict]:
    import torch

    from rcomp.models.loading import load
    from rcomp.onnx import export as E
    from rcomp.onnx import ortquant as Q
    from rcomp.onnx.runtime import OnnxClassifier
    from rcomp.quant.ptq import quantize

    setup_threads(1)
    dense = load(work / "r18.safetensors")
    raw = (work / "r18.onnx").read_bytes() if (work / "r18.onnx").exists() else E.to_onnx(dense, "legacy")
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(32, 3, 32, 32, generator=g) for _ in range(4)]
    chosen, _ = Q.choose_activation()
    variants = {"eager fp32": dense, "ORT fp32": OnnxClassifier(raw, dense.meta, {})}
    for act in dict.fromkeys((chosen, "s8s8")):
        variants[f"ORT int8 {act}"] = OnnxClassifier(Q.quantize_static(raw, calib, act), dense.meta, {})
    variants["torch.ao int8 (x86)"] = quantize(dense, calib, bits=8, backend="x86")
    variants["pt2e int8 (rcomp quantize's default)"] = quantize(dense, calib, bits=8)
    x = torch.rand(64, 3, 32, 32, generator=g)
    rounds = 5 if quick else 15
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for m in variants.values():
            m(x)
        for _ in range(rounds):  # interleaved: load changes hit every variant alike
            for k, m in variants.items():
                c0 = time.process_time()
                m(x)
                times[k].append((time.process_time() - c0) * 1000)
    base = statistics.median(times["eager fp32"])
    from rcomp.evaluation.cost import count_macs

    gmac = count_macs(dense, (3, 32, 32)) * 64 / 1e9
    rows = []
    for k, t in times.items():
        med = statistics.median(t)
        spread = (f"median {med:.1f} ms CPU time = {gmac / med * 1000:.1f} GMAC/s, min {min(t):.1f}, max {max(t):.1f}, "
                  f"{rounds} rounds")
        target = ">= 3.5x" if k == f"ORT int8 {chosen}" else None
        rows.append(row(f"batch 64 speed vs eager fp32: {k} ({spread})", round(base / med, 2), target,
                        (base / med >= 3.5) if target else None))
    eager_rate = gmac / base * 1000
    best = _kernel_ceiling(chosen, quick)
    rows.append(row(f"ceiling: ONNX Runtime int8 ({chosen}) GMAC/s on one 3x3 convolution, best of C=64..512 "
                    "(resnet18-cifar's shapes, batch 64)", round(best, 1)))
    rows.append(row(f"ceiling: ORT int8 speed-up the eager fp32 rate of this run allows ({best:.1f} / "
                    f"{eager_rate:.1f} GMAC/s); the 3.5x target is out of reach where this is below 3.5",
                    round(best / eager_rate, 2)))
    return rows


def _kernel_ceiling(activation: str, quick: bool) -> float:
    """The highest multiply-accumulate rate ONNX Runtime's int8 convolution reaches here: one 3x3
    convolution + ReLU at each of resnet18-cifar's widths (64x32x32 .. 512x4x4), batch 64, 1 thread, GMAC/s
    (CPU time, median of rounds). On AVX2 without VNNI the u8s8 kernels multiply-add 8-bit pairs into 16-bit
    sums and then 32-bit ones: about twice the fp32 FMA rate at best, whatever the graph around them."""
    import io
    import warnings

    import torch

    from rcomp.onnx import ortquant as Q
    from rcomp.onnx.runtime import make_session

    best = 0.0
    for c, size in ((64, 32), (128, 16), (256, 8), (512, 4)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU()).eval()
        x = torch.rand(64, c, size, size)
        buf = io.BytesIO()
        with warnings.catch_warnings():  # the legacy exporter's deprecation: the fast one for a single layer
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, (x,), buf, dynamo=False, input_names=["x"], opset_version=18)
        sess = make_session(Q.quantize_static(buf.getvalue(), [x], activation))
        xn = x.numpy()
        sess.run(None, {"x": xn})
        t = []
        for _ in range(3 if quick else 7):
            c0 = time.process_time()
            sess.run(None, {"x": xn})
            t.append(time.process_time() - c0)
        best = max(best, 64 * c * c * 9 * size * size / statistics.median(t) / 1e9)
    return best


def _robustness(work: Path, ckpt: Path, quick: bool) -> list[dict]:
    import json

    n = "60" if quick else "200"
    int8 = work / "c8.int8.safetensors"
    assert _cli("quantize", ckpt, "--data", "digits", "-o", int8, "--force")[0] == 0
    code, out, err = _cli("attack", int8, "--data", "digits", "-n", n, "--attack", "auto", "--eps", "0.1", "--json")
    assert code == 0, err
    ref = json.loads(out)
    onnx_int8 = ckpt.with_suffix(".int8.onnx")
    code, out, err = _cli("attack", onnx_int8, "--data", "digits", "-n", n, "--attack", "auto", "--eps", "0.1",
                          "--json")
    assert code == 0, err
    got = json.loads(out)
    diff = 100 * (got["worst_case_acc"] - ref["worst_case_acc"])
    # a closer surrogate: the simulated int8 (fake-quant) model of the same float checkpoint
    sim = work / "c8.sim8.safetensors"
    assert _cli("quantize", ckpt, "--simulate", "--bits", "8", "--data", "digits", "-o", sim, "--force")[0] == 0
    code, out, err = _cli("attack", onnx_int8, "--data", "digits", "-n", n, "--attack", "auto", "--eps", "0.1",
                          "--surrogate", sim, "--json")
    assert code == 0, err
    got_sim = json.loads(out)
    diff_sim = 100 * (got_sim["worst_case_acc"] - ref["worst_case_acc"])
    # the same attack on both: the int8 checkpoint (pt2e, the default) attacked the way the file is (gradients from the fp32
    # source checkpoint, Square on the int8 model); splits the difference into attack and model
    import rcomp
    from rcomp.models.loading import load

    m8 = load(int8)
    m8.set_gradient_model(load(ckpt))
    alike = rcomp.attack(m8, data="digits", n=int(n), attack="auto", eps="0.1", log=lambda *a, **k: None).report
    diff_attack = 100 * (alike["worst_case_acc"] - ref["worst_case_acc"])
    diff_model = 100 * (got["worst_case_acc"] - alike["worst_case_acc"])
    return [
        row("ORT int8 file, gradients from --surrogate simulated int8 (fake-quant) checkpoint: worst case",
            got_sim["worst_case_acc"], None, None,
            f"rcomp attack {onnx_int8.name} --data digits --attack auto --eps 0.1 --surrogate {sim.name}"),
        row("difference (file with fake-quant surrogate - int8 checkpoint (pt2e, the default)), points", round(diff_sim, 2),
            "within 1 point", abs(round(diff_sim, 6)) <= 1.0),
        row(f"int8 checkpoint (pt2e, the default): rcomp attack --attack auto, eps 0.1, n={n} (clean {ref['clean_acc']:.3f})",
            ref["worst_case_acc"], None, None, f"rcomp attack {int8.name} --data digits --attack auto --eps 0.1"),
        row(f"ORT int8 file: worst of APGD transfer from the source checkpoint and Square on the file (clean "
            f"{got['clean_acc']:.3f}; {got['gradient_source']})", got["worst_case_acc"], None, None,
            f"rcomp attack {onnx_int8.name} --data digits --attack auto --eps 0.1"),
        row("difference (file - int8 checkpoint (pt2e, the default)), points", round(diff, 2), "within 1 point",
            abs(round(diff, 6)) <= 1.0),
        row("int8 checkpoint (pt2e, the default) attacked like the file (APGD transfer from the source checkpoint, Square on "
            "the checkpoint): worst case", alike["worst_case_acc"], None, None,
            "rcomp.attack(int8 model with the source checkpoint as gradient model, attack='auto')"),
        row("  of which the attack (black-box transfer - white-box through the twin, same checkpoint), points",
            round(diff_attack, 2), None, None),
        row("  of which the file (ORT int8 file - int8 checkpoint (pt2e, the default), same attack), points",
            round(diff_model, 2), "within 1 point", abs(round(diff_model, 6)) <= 1.0),
    ]


def run(quick: bool = False) -> list[dict]:
    exporter = "legacy" if "--legacy" in sys.argv else "dynamo"
    with tempfile.TemporaryDirectory(prefix="rcomp-bench-export-") as tmp:
        work = Path(tmp)
        rows = [row("CPU", _cpu()), row("thread policy", f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
                                                          "1 thread (torch and ONNX Runtime)")]
        rows += _parity(work, quick, exporter)
        acc, ckpt = _int8_accuracy(work, quick)
        rows += acc
        rows += _speed(work, quick)
        rows += _robustness(work, ckpt, quick)
    return rows


if __name__ == "__main__":
    main(run, {"--legacy": dict(action="store_true", help="export with the legacy (TorchScript) exporter")})
