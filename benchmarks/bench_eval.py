"""Evaluation: `bench` throughput (clean + FGSM + PGD-10) and peak memory as -n grows (fake data).

The model is convnet8 at 3x32x32 trained for two epochs on the fake training split, so nearly every
test point is classified correctly clean and is attacked (a random-init model would skip most
attacks and overstate throughput). Each n runs in a fresh process so its peak RSS is its own.
Target: flat memory (peak RSS at the largest n within 10% of the smallest).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, row  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
from rcomp.evaluation.bench import bench, build_attacks
from rcomp.parsing import parse_eps_list
ckpt, n = sys.argv[1], int(sys.argv[2])
attacks = build_attacks(["fgsm", "pgd"], parse_eps_list("8/255"), lenient=True)
t0 = time.perf_counter()
res = bench([ckpt], "fake", attacks, n=n, progress=False, latency_batches=())
dt = time.perf_counter() - t0
m = res["models"][0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# floor: per batch of 128, one clean forward + 11 x (forward + backward to the input) (FGSM + PGD-10)
sys.path.insert(0, sys.argv[3])
from common import median_time
from rcomp.models.loading import load
model = load(ckpt).eval()
x = torch.rand(128, 3, 32, 32)
y = torch.randint(0, 10, (128,))
def fwd_bwd():
    xi = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(xi), y).backward()
def fwd():
    with torch.inference_mode():
        model(x)
floor = (median_time(fwd, reps=7) + 11 * median_time(fwd_bwd, reps=7)) * res["n"] / 128
print(json.dumps({"n": res["n"], "seconds": dt, "peak_mb": peak, "floor": floor,
                  "clean": m["clean_acc"], "worst": m["worst_case_acc"]}))
"""


def run(quick: bool = False) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from rcomp.data.registry import data_info, get_dataset, make_loader
    from rcomp.models.loading import save
    from rcomp.models.registry import build_model

    tmp = Path(tempfile.mkdtemp())
    ckpt = tmp / "convnet8.safetensors"
    torch.manual_seed(0)
    torch.set_num_threads(2)
    info = data_info("fake")
    model = build_model("convnet8", 10, info.shape, list(info.mean), list(info.std), dataset="fake")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):  # brief standard training: fake data is easy, clean accuracy ends near 1
        for x, y in make_loader(get_dataset("fake", "train", model.meta.input), 64, shuffle=True, seed=0):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    save(model.eval(), ckpt)
    sizes = [500, 2000] if quick else [1000, 10000]
    out = []
    for n in sizes:
        r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(n), str(Path(__file__).resolve().parent)], capture_output=True, text=True,
                           check=True)
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cmd = f"python benchmarks/bench_eval.py{' --quick' if quick else ''} (convnet8 3x32x32 trained 2 epochs, fake data, fgsm+pgd-10 at 8/255)"
    rows = []
    for o in out:
        rows.append(row(f"clean / worst-case accuracy at n={o['n']}", f"{o['clean']:.3f} / {o['worst']:.3f}", command=cmd))
        rows.append(row(f"bench throughput at n={o['n']} (examples/s, clean + FGSM + PGD-10)", o["n"] / o["seconds"],
                        command=cmd))
        rows.append(row(f"bench time / floor at n={o['n']} (floor: clean forward + 11 x forward+backward)",
                        o["seconds"] / o["floor"], command=cmd))
        rows.append(row(f"peak RSS at n={o['n']} (MB)", o["peak_mb"], command=cmd))
    ratio = out[-1]["peak_mb"] / out[0]["peak_mb"]
    rows.append(row(f"peak memory n={out[-1]['n']} / n={out[0]['n']}", ratio, "<= 1.1 (flat)", ratio <= 1.1, cmd))
    return rows


if __name__ == "__main__":
    main(run)
