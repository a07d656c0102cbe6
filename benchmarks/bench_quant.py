"""Is real int8 worth it? resnet18-cifar int8 (torch.ao FX, x86) against fp32 on CPU.

Trains resnet18-cifar on digits upsampled to 3x32x32 (a few epochs, Adam), quantizes it to int8
with 256 calibration images, and measures in the same run: latency at batch 1 and 64
(torch.set_num_threads(2), medians after warm-up), checkpoint size, digits test accuracy.
Targets (issue): >= 3x faster at batch 64, <= 0.3x the file size, accuracy within 1 point.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import main, median_time, row, setup_threads  # noqa: E402

CMD = "python benchmarks/bench_quant.py"


def _accuracy(model, loader) -> float:
    import torch

    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    return correct / n


def run(quick: bool = False) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from rcomp.data.registry import DATASETS, get_dataset, make_loader
    from rcomp.io.checkpoint import to_bytes
    from rcomp.models.registry import build_model
    from rcomp.quant.ptq import quantize

    setup_threads(2)
    torch.manual_seed(0)
    info = DATASETS["digits"]
    model = build_model("resnet18-cifar", 10, (3, 32, 32), list(info.mean) * 3, list(info.std) * 3,
                        dataset="digits")
    train = get_dataset("digits", "train", model.meta.input)
    test = make_loader(get_dataset("digits", "test", model.meta.input), 128)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(1 if quick else 3):
        for x, y in make_loader(train, 64, shuffle=True, seed=0):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    calib = [x for x, _ in make_loader(train, 64, shuffle=True, seed=1, n=256)]
    qmodel = quantize(model, calib, bits=8)

    rows = []
    reps = 5 if quick else 20
    times = {}
    for batch in (1, 64):
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            for name, m in (("fp32", model), ("int8", qmodel)):
                times[(name, batch)] = median_time(lambda m=m, x=x: m(x), reps=reps, warmup=3)
        for name in ("fp32", "int8"):
            rows.append(row(f"latency {name}, batch {batch} (ms)", times[(name, batch)] * 1e3, command=CMD))
        speedup = times[("fp32", batch)] / times[("int8", batch)]
        target = ">= 3x" if batch == 64 else None
        rows.append(row(f"int8 speed-up, batch {batch}", speedup, target, speedup >= 3 if batch == 64 else None, CMD))
    size_fp32, size_int8 = len(to_bytes(model)), len(to_bytes(qmodel))
    rows.append(row("file size fp32 (MB)", size_fp32 / 1e6, command=CMD))
    rows.append(row("file size int8 (MB)", size_int8 / 1e6, command=CMD))
    ratio = size_int8 / size_fp32
    rows.append(row("file size ratio int8/fp32", ratio, "<= 0.3", ratio <= 0.3, CMD))
    acc_fp32, acc_int8 = _accuracy(model, test), _accuracy(qmodel, test)
    rows.append(row("digits accuracy fp32", acc_fp32, command=CMD))
    rows.append(row("digits accuracy int8", acc_int8, command=CMD))
    drop = (acc_fp32 - acc_int8) * 100
    rows.append(row("accuracy drop (points)", drop, "<= 1", drop <= 1, CMD))
    return rows


if __name__ == "__main__":
    main(run)
