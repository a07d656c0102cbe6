"""Start-up and the fixed cost of a stage process.

`rcomp --help` and `rcomp info CKPT` (a 45 MB resnet18 checkpoint) against `import torch`; a bad option
value refused before torch loads; the fixed cost of a stage process (imports, load, data) as a tiny
`rcomp prune` and `rcomp attack` on a convnet8. With RCOMP_BASELINE=/path/to/an/older/checkout the stage
commands also run from that checkout in the same run, and the ratios are reported.

Targets: `--help` under 0.3 s, `info` under 0.5 s, a bad value refused under 0.5 s, stage fixed cost
no larger than the baseline's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, median_time, row  # noqa: E402

# Measure the usual state, compiled bytecode cached: with PYTHONDONTWRITEBYTECODE set (as on some
# CI images) every start would recompile rcomp's sources, which is not what users see.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _cmd(args: list[str], env: dict | None = None):
    def go():
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or _ENV)

    return go


def _stage_cmds(py: str, tmp: Path, small: Path) -> dict[str, list[str]]:
    return {
        "prune": [py, "-m", "rcomp", "prune", str(small), "--ratio", "0.5", "-o", str(tmp / "p.safetensors"),
                  "--force"],
        "attack": [py, "-m", "rcomp", "attack", str(small), "--data", "digits", "--attack", "fgsm", "--eps", "0.1",
                   "-n", "8", "--device", "cpu"],
    }


def _stage_rows(py: str, tmp: Path, reps: int) -> list[dict]:
    import torch

    from rcomp.models.loading import save
    from rcomp.models.registry import build_model

    small = tmp / "convnet8.safetensors"
    torch.manual_seed(0)
    save(build_model("convnet8", 10, (1, 8, 8), dataset="digits"), small)
    base = os.environ.get("RCOMP_BASELINE")
    rows = []
    for name, args in _stage_cmds(py, tmp, small).items():
        now = median_time(_cmd(args), reps=reps, warmup=1)
        rows.append(row(f"rcomp {name} fixed cost, convnet8 (s)", now, command=" ".join(args[2:])))
        if base:
            old = median_time(_cmd(args, {**_ENV, "PYTHONPATH": base}), reps=reps, warmup=1)
            rows.append(row(f"rcomp {name} fixed cost, new / baseline (x)", now / old, "<= 1.1", now / old <= 1.1,
                            f"RCOMP_BASELINE={base}"))
    return rows


def run(quick: bool = False) -> list[dict]:
    import torch

    from rcomp.models.loading import save
    from rcomp.models.registry import build_model

    reps = 3 if quick else 10
    tmp = Path(tempfile.mkdtemp())
    ckpt = tmp / "resnet18.safetensors"
    torch.manual_seed(0)
    save(build_model("resnet18", 10, (3, 32, 32)), ckpt)
    size_mb = os.path.getsize(ckpt) / 1e6
    py = sys.executable
    t_torch = median_time(_cmd([py, "-c", "import torch"]), reps=reps, warmup=1)
    t_help = median_time(_cmd([py, "-m", "rcomp", "--help"]), reps=reps, warmup=1)
    t_info = median_time(_cmd([py, "-m", "rcomp", "info", str(ckpt)]), reps=reps, warmup=1)
    bad = [py, "-m", "rcomp", "prune", str(ckpt), "--ratio", "50"]
    t_bad = median_time(lambda: subprocess.run(bad, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_ENV),
                        reps=reps, warmup=1)
    return [
        row("rcomp prune --ratio 50 refused (s)", t_bad, "< 0.5", t_bad < 0.5, "python -m rcomp prune CKPT --ratio 50"),
        *_stage_rows(py, tmp, reps),
        row("python -c 'import torch' (s)", t_torch, command="python -c 'import torch'"),
        row("rcomp --help (s)", t_help, "< 0.3", t_help < 0.3, "python -m rcomp --help"),
        row(f"rcomp info on a {size_mb:.0f} MB checkpoint (s)", t_info, "< 0.5", t_info < 0.5,
            "python -m rcomp info resnet18.safetensors"),
        row("import torch / rcomp --help (x)", t_torch / t_help, command="ratio of the two above"),
    ]


if __name__ == "__main__":
    main(run)
