"""How close is rcomp's PGD-10 to its floor of 10 x (forward + backward to the input)?

resnet18-cifar (random weights: the cost does not depend on them), batch 128 at 3x32x32, CPU, 2
threads. The floor is one forward pass plus a backward pass to the input only (torch.autograd.grad
w.r.t. the images), per step. rcomp's PGD adds the random start, the projection and the per-example
bookkeeping of the first fooling iterate; the target is at most 1.1x the floor. The ratio is the
median over repetitions of (PGD-10 time) / (10 x forward+backward time) measured back to back, so
slow drifts of a shared machine cancel out. Also reported: the
clean forward under torch.inference_mode against no_grad (what evaluate() uses), and FGSM against
one forward+backward.

    python benchmarks/bench_attack_cost.py            # batch 128
    python benchmarks/bench_attack_cost.py --quick    # batch 32, fewer repetitions
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import main, median_time, row, setup_threads  # noqa: E402


def run(quick: bool = False) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from rcomp.attacks import make_attack
    from rcomp.models.registry import build_model

    setup_threads(2)
    batch = 32 if quick else 128
    reps = 3 if quick else 5
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 10, (3, 32, 32)).eval()
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def fwd():
        with torch.no_grad():
            model(x)

    def fwd_inference():
        with torch.inference_mode():
            model(x)

    def fwd_bwd():
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xi), y, reduction="sum"), [xi])

    pgd = make_attack("pgd", 8 / 255, steps=10, seed=0)
    fgsm = make_attack("fgsm", 8 / 255, seed=0)
    t_f = median_time(fwd, reps=reps)
    t_fi = median_time(fwd_inference, reps=reps)
    t_fb = median_time(fwd_bwd, reps=reps)
    fgsm_ratios = []
    for _ in range(reps):  # interleaved like PGD below: floor, FGSM, floor
        f1 = median_time(fwd_bwd, reps=1, warmup=0)
        tg = median_time(lambda: fgsm(model, x, y), reps=1, warmup=0)
        f2 = median_time(fwd_bwd, reps=1, warmup=0)
        fgsm_ratios.append(tg / ((f1 + f2) / 2))
    fgsm_ratio = statistics.median(fgsm_ratios)
    pgd(model, x, y)  # warm-up
    ratios, pgd_times, floors = [], [], []
    for _ in range(reps):  # interleaved: floor, PGD, floor
        f1 = median_time(fwd_bwd, reps=1, warmup=0)
        tp = median_time(lambda: pgd(model, x, y), reps=1, warmup=0)
        f2 = median_time(fwd_bwd, reps=1, warmup=0)
        floors.append(10 * (f1 + f2) / 2)
        pgd_times.append(tp)
        ratios.append(tp / floors[-1])
    ratio = statistics.median(ratios)
    t_pgd, floor = statistics.median(pgd_times), statistics.median(floors)
    cmd = f"python benchmarks/bench_attack_cost.py{' --quick' if quick else ''}"
    return [
        row(f"forward, no_grad, batch {batch} (ms)", t_f * 1000, command=cmd),
        row(f"forward, inference_mode, batch {batch} (ms)", t_fi * 1000, command=cmd),
        row(f"forward + backward to input, batch {batch} (ms)", t_fb * 1000, command=cmd),
        row(f"floor: 10 x (forward + backward), batch {batch} (s)", floor, command=cmd),
        row(f"rcomp PGD-10, batch {batch} (s)", t_pgd, command=cmd),
        row("PGD-10 / floor (median of back-to-back ratios)", ratio, "<= 1.1", ratio <= 1.1, cmd),
        row("FGSM / (forward + backward) (median of back-to-back ratios)", fgsm_ratio, "<= 1.1",
            fgsm_ratio <= 1.1, cmd),
    ]


if __name__ == "__main__":
    main(run)
