"""Is the pt2e int8 runtime at least as fast as torch.ao's int8, and does it compute the same model?

One run, 1 torch thread, OMP_WAIT_POLICY=PASSIVE (set before torch loads), batch 64, on convnet8 trained
on digits (1x8x8), a seeded resnet18-cifar and a seeded torchvision mobilenet_v2 (3x32x32):

* eager fp32; torch.ao int8 (``--backend x86``); pt2e int8 (``--backend pt2e``: rcomp's int8 twin on
  oneDNN's int8 kernels, the graph built by rcomp, run eagerly); the twin's pt2e QDQ graph exported and
  lowered by torchao's ``lower_pt2e_quantized_to_x86`` (batch pinned to 64: what ``--backend pt2e`` ran
  before rcomp built the graph itself; its outputs must equal rcomp's bit for bit); rcomp's pt2e graph under
  ``torch.compile`` (inductor, freezing); and torchao's own flow (``prepare_pt2e`` / ``convert_pt2e`` with
  ``X86InductorQuantizer``, its own calibration on the same images, lowered the same way) for reference.
* latency: CPU-time medians of interleaved rounds (every variant once per round) with the spread
  (min-max), speed-up against eager fp32; lowering and compile seconds (wall).
* agreement: top-1 agreement and max abs logit difference against torch.ao int8 (the stored checkpoint's
  reference runtime); digits test accuracy for convnet8.

Targets: pt2e int8 at least as fast as torch.ao int8 (issue 24), eager and compiled; top-1 agreement >= 99%.
--quick: fewer rounds and the convnet8 model only. Speed figures from a loaded machine cannot be trusted:
the CPU and its load are printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no busy-waiting threads

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import main, row, setup_threads, train_classifier  # noqa: E402

CMD = "python benchmarks/bench_int8_backends.py"
BATCH = 64


def cpu_text() -> str:
    name, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX512-VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags else \
        "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{name} ({isa}), {os.cpu_count()} cores, load average {load:.2f}"


def _digits_convnet8(epochs: int):
    import torch

    from rcomp.data.registry import get_dataset

    model = train_classifier("convnet8", "digits", (1, 8, 8), epochs)
    train = get_dataset("digits", "train", model.meta.input)
    test = get_dataset("digits", "test", model.meta.input)
    calib = torch.stack([train[i][0] for i in range(256)])
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    return model, calib, x, y


def _resnet18_cifar():
    import torch

    from rcomp.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 10, (3, 32, 32)).eval()
    return model, torch.rand(128, 3, 32, 32), torch.rand(256, 3, 32, 32), None


def _mobilenet_v2():
    import torch

    from rcomp.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 10, (3, 32, 32)).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # trained-like BatchNorm statistics: real biases, no dead channels
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return model, torch.rand(128, 3, 32, 32), torch.rand(256, 3, 32, 32), None


def _official_pt2e(model, calib):
    """torchao's own flow: export, prepare_pt2e(X86InductorQuantizer), calibrate, convert_pt2e, lower."""
    import torch
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from rcomp.quant.backend import fold_batchnorm

    xb = model.normalize(calib[:BATCH])
    gm = torch.export.export(fold_batchnorm(model.net), (xb,)).module()
    gm = prepare_pt2e(gm, xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config()))
    with torch.no_grad():
        for i in range(0, len(calib) - len(calib) % BATCH, BATCH):  # the export pinned the batch size
            gm(model.normalize(calib[i:i + BATCH]))
    return lower_pt2e_quantized_to_x86(convert_pt2e(gm), (xb,))  # pins batch 64


def _pinned(p2, xb):
    """The twin's pt2e QDQ graph exported and lowered by torchao's own function (pins the batch size): the graph
    rcomp's lowering must equal."""
    import torch
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    from rcomp.quant.pt2e import qdq_graph

    graph = qdq_graph(p2.gradient_model().fq)
    return lower_pt2e_quantized_to_x86(torch.export.export(graph, (xb,)).module(), (xb,))


def _one(name: str, model, calib, x, y, rounds: int, compile_: bool) -> list[dict]:
    import torch

    from rcomp.quant.pt2e import compiled, fused_ops
    from rcomp.quant.ptq import quantize

    rows = []
    tag = f"{name}, batch {BATCH}"
    t0 = time.perf_counter()
    ao = quantize(model, [calib], backend="x86")
    t_ao = time.perf_counter() - t0
    t0 = time.perf_counter()
    p2 = quantize(model, [calib], backend="pt2e")
    t_p2 = time.perf_counter() - t0
    assert fused_ops(p2.net), "pt2e lowering did not fuse any int8 op"
    xb = model.normalize(x[:BATCH])
    t0 = time.perf_counter()
    pinned = _pinned(p2, xb)
    t_pin = time.perf_counter() - t0
    with torch.no_grad():
        same = torch.equal(pinned(xb), p2.net(xb))
    rows.append(row(f"{tag}: rcomp's pt2e graph equals torchao's lowering of the same twin, bit for bit", same,
                    True, same, CMD))
    variants = {"eager fp32": lambda: model.net(xb), "torch.ao int8": lambda: ao.net(xb),
                "pt2e int8 (rcomp's graph, eager)": lambda: p2.net(xb),
                "pt2e QDQ graph lowered by torchao (export, batch pinned to 64)": lambda: pinned(xb)}
    t_comp = None
    if compile_:
        t0 = time.perf_counter()
        fast = compiled(p2.net)
        with torch.no_grad():
            fast(xb)
        t_comp = time.perf_counter() - t0
        variants["pt2e int8 + torch.compile"] = lambda: fast(xb)
    t0 = time.perf_counter()
    official = _official_pt2e(model, calib)
    t_off = time.perf_counter() - t0
    variants["torchao X86InductorQuantizer (own calibration), lowered"] = lambda: official(xb)

    from torch.ao.quantization import FakeQuantizeBase

    fqs = [m for m in ao.gradient_model().fq.modules() if isinstance(m, FakeQuantizeBase)]
    step = float(fqs[-1].scale)  # the logits' quantization step (torch.ao quantizes the output too)
    with torch.no_grad():
        ref = ao(x)
        outs = {"pt2e int8 (rcomp's graph, eager)": p2(x), "eager fp32": model(x)}
        if compile_:
            outs["pt2e int8 + torch.compile"] = torch.cat([fast(model.normalize(x[i:i + BATCH]))
                                                           for i in range(0, len(x) - len(x) % BATCH, BATCH)])
        n_off = len(x) - len(x) % BATCH
        outs["torchao X86InductorQuantizer (own calibration), lowered"] = torch.cat(
            [official(model.normalize(x[i:i + BATCH])) for i in range(0, n_off, BATCH)])
    for k, out in outs.items():
        r = ref[: len(out)]
        agree = (out.argmax(1) == r.argmax(1)).float().mean().item()
        rows.append(row(f"{tag}: {k} top-1 agreement with torch.ao int8 ({len(out)} images)", round(agree, 4),
                        ">= 0.99" if k.startswith("pt2e int8") else None, agree >= 0.99 if k.startswith("pt2e int8") else None,
                        CMD))
        diff = (out - r).abs().max().item()
        rows.append(row(f"{tag}: {k} max abs logit diff to torch.ao int8 (in output steps of {step:.3g})",
                        f"{diff:.4g} ({diff / step:.2f})", None, None, CMD))
        if y is not None:
            yy = y[: len(out)]
            rows.append(row(f"{tag}: digits test accuracy {k} (torch.ao int8 {(r.argmax(1) == yy).float().mean():.4f})",
                            round((out.argmax(1) == yy).float().mean().item(), 4), None, None, CMD))

    times = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
            fn()
        for _ in range(rounds):
            for k, fn in variants.items():
                t0 = time.process_time()
                fn()
                times[k].append(time.process_time() - t0)
    base = statistics.median(times["eager fp32"])
    ao_med = statistics.median(times["torch.ao int8"])
    for k, v in times.items():
        med = statistics.median(v)
        rows.append(row(f"{tag}: {k} CPU ms, median [min, max] of {rounds}",
                        f"{med * 1e3:.2f} [{min(v) * 1e3:.2f}, {max(v) * 1e3:.2f}]", None, None, CMD))
        if k != "eager fp32":
            target = k.startswith("pt2e int8")
            rows.append(row(f"{tag}: {k} speed-up vs eager fp32 (torch.ao int8: {base / ao_med:.2f}x)",
                            round(base / med, 2), ">= torch.ao int8" if target else None,
                            (base / med >= base / ao_med) if target else None, CMD))
    rows.append(row(f"{name}: seconds (wall) to quantize: torch.ao / pt2e (rcomp's graph) / torchao own flow; "
                    "torchao's export + lowering of the twin", f"{t_ao:.1f} / {t_p2:.1f} / {t_off:.1f}; {t_pin:.1f}",
                    None, None, CMD))
    if t_comp is not None:
        rows.append(row(f"{name}: torch.compile seconds (wall, first call at batch {BATCH})", round(t_comp, 1),
                        None, None, CMD))
    return rows


def run(quick: bool = False) -> list[dict]:
    setup_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    rows = [row("CPU", cpu_text(), None, None, CMD),
            row("threads / OMP wait policy", f"1 / {os.environ.get('OMP_WAIT_POLICY')}", None, None, CMD)]
    rounds = 5 if quick else 15
    rows += _one("convnet8 digits 1x8x8", *_digits_convnet8(2 if quick else 6), rounds=rounds, compile_=True)
    if not quick:
        rows += _one("resnet18-cifar 3x32x32", *_resnet18_cifar(), rounds=9, compile_=True)
        rows += _one("mobilenet_v2 3x32x32", *_mobilenet_v2(), rounds=15, compile_=False)
    rows.append(row("CPU load average after the run", f"{os.getloadavg()[0]:.2f}", None, None, CMD))
    return rows


if __name__ == "__main__":
    main(run)
