"""Cost of one adversarial training epoch relative to a standard one (same run, same machine).

Model: convnet8 at 1x28x28 (the study's Fashion-MNIST shape) on 768 synthetic images held in
memory, batch 128, CPU, 1 thread (the machine is shared: one thread keeps contention from
distorting ratios); the modes run round-robin, one epoch each per round, median of 3 rounds
after a warm-up round. Targets (issue): fgsm at most 2.3x a standard
epoch; pgd with k steps at most 1.1 x (k + 1). TRADES with k steps is reported for reference.
N-FGSM and GradAlign (issue 25) check rcomp.train.budget's pass counts: n-fgsm 2 passes a step
like fgsm, GradAlign 4 more (6 with fgsm); the catastrophic-overfitting guard is off here (its
checks are not training and are costed separately).
"""

from __future__ import annotations

import statistics

try:
    from benchmarks.common import main, row, setup_threads
except ImportError:  # run as a script
    from common import main, row, setup_threads

COMMAND = "python benchmarks/bench_train_cost.py"


def _data():
    import torch

    from rcomp.data.sources import FakeImages, TensorImages
    from rcomp.spec import InputSpec

    fake = FakeImages(768, InputSpec(1, 28, 28, [0.5], [0.25]), 10, seed=0)
    items = [fake[i] for i in range(len(fake))]
    return TensorImages(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), 10)


def _epoch_seconds(mode: str, steps: int | None, ds, grad_align: float = 0.0) -> float:
    import torch

    from rcomp.models.registry import build_model
    from rcomp.train import AdvConfig, TrainConfig, finetune

    torch.manual_seed(0)
    model = build_model("convnet8", 10, (1, 28, 28), [0.5], [0.25])
    cfg = TrainConfig(epochs=1, adv=AdvConfig(mode, 0.1, None, steps, grad_align=grad_align), progress=False,
                      overfit_guard=False)
    _, metrics = finetune(model, ds, cfg)
    return metrics["epoch_seconds"][0]


MODES = [("none", None), ("fgsm", None), ("pgd", 7), ("pgd", 10), ("trades", 10), ("n-fgsm", None),
         ("fgsm", None, 0.2)]


def run(quick: bool = False) -> list[dict]:
    setup_threads(1)
    ds = _data()
    times: dict[tuple, list[float]] = {m: [] for m in MODES}
    for r in range(2 if quick else 4):
        for m in MODES:
            t = _epoch_seconds(*m, ds)
            if r:  # round 0 is the warm-up
                times[m].append(t)
    med = {m: statistics.median(v) for m, v in times.items()}
    base = med[("none", None)]
    rows = [row("standard epoch (s)", base, command=COMMAND)]
    fgsm = med[("fgsm", None)] / base
    rows.append(row("fgsm epoch / standard", fgsm, "<= 2.3", fgsm <= 2.3, COMMAND))
    for k in (7, 10):
        r = med[("pgd", k)] / base
        rows.append(row(f"pgd-{k} epoch / standard", r, f"<= {1.1 * (k + 1):.1f}", r <= 1.1 * (k + 1), COMMAND))
    rows.append(row("trades-10 epoch / standard", med[("trades", 10)] / base, "-", None, COMMAND))
    nf = med[("n-fgsm", None)] / base
    rows.append(row("n-fgsm epoch / standard (counted 2)", nf, "<= 2.3", nf <= 2.3, COMMAND))
    ga = med[("fgsm", None, 0.2)] / base
    rows.append(row("fgsm + grad-align epoch / standard (counted 6)", ga, "<= 6.6", ga <= 6.6, COMMAND))
    return rows


if __name__ == "__main__":
    main(run)
