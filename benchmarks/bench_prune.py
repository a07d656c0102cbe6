"""Does structured pruning make models faster, and is pruning itself quick?

* resnet18-cifar (3x32x32, 10 classes) pruned at ratio 0.5 with L1 importance: MACs factor
  (target >= 3.5x) and CPU batch-64 latency factor, dense vs pruned in the same run (target: at
  least 0.7 times the MACs factor);
* wall time of pruning torchvision resnet50 at 3x224x224 at ratio 0.5 (target: seconds, < 60 s).

    python benchmarks/bench_prune.py [--quick]
"""

from __future__ import annotations

import time

from common import main, median_time, row, setup_threads

COMMAND = "python benchmarks/bench_prune.py"


def run(quick: bool = False) -> list[dict]:
    import torch

    from rcomp.models.registry import build_model
    from rcomp.pruning import prune

    setup_threads(2)
    reps = 3 if quick else 10
    torch.manual_seed(0)
    dense = build_model("resnet18-cifar", 10, (3, 32, 32)).eval()
    pruned, rep = prune(build_model("resnet18-cifar", 10, (3, 32, 32)).eval(), 0.5)
    pruned.eval()
    x = torch.rand(64, 3, 32, 32)

    def timed(m):
        with torch.inference_mode():
            return median_time(lambda: m(x), reps=reps, warmup=2)

    # interleave dense and pruned measurements so machine load hits both alike
    t_dense, t_pruned = [], []
    for _ in range(2 if quick else 3):
        t_dense.append(timed(dense))
        t_pruned.append(timed(pruned))
    td, tp_ = min(t_dense), min(t_pruned)
    macs_f = rep.macs_factor
    lat_f = td / tp_
    rows = [
        row("resnet18-cifar r=0.5 params (M) dense -> pruned",
            f"{rep.params_before / 1e6:.2f} -> {rep.params_after / 1e6:.2f}", command=COMMAND),
        row("resnet18-cifar r=0.5 MACs (M) dense -> pruned",
            f"{rep.macs_before / 1e6:.1f} -> {rep.macs_after / 1e6:.1f}", command=COMMAND),
        row("resnet18-cifar r=0.5 MACs factor", macs_f, ">= 3.5", macs_f >= 3.5, COMMAND),
        row("resnet18-cifar batch-64 CPU latency (ms) dense -> pruned", f"{td * 1e3:.1f} -> {tp_ * 1e3:.1f}",
            command=COMMAND),
        row("resnet18-cifar batch-64 latency factor", lat_f, f">= {0.7 * macs_f:.2f} (0.7 x MACs factor)",
            lat_f >= 0.7 * macs_f, COMMAND),
    ]
    big = build_model("resnet50", 1000, (3, 224, 224)).eval()
    t0 = time.perf_counter()
    _, rep50 = prune(big, 0.5)
    wall = time.perf_counter() - t0
    rows += [
        row("resnet50 224x224 r=0.5 prune wall time (s), incl. MACs counting", wall, "< 60 s", wall < 60, COMMAND),
        row("resnet50 224x224 r=0.5 MACs (G) dense -> pruned",
            f"{rep50.macs_before / 1e9:.2f} -> {rep50.macs_after / 1e9:.2f}", command=COMMAND),
    ]
    return rows


if __name__ == "__main__":
    main(run)
