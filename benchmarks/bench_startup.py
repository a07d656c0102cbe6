"""Start-up: `rcomp --help` and `rcomp info CKPT` (a 45 MB resnet18 checkpoint) against `import torch`.

Targets: `--help` under 0.3 s, `info` under 0.5 s on this machine.
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


def _cmd(args: list[str]):
    def go():
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_ENV)

    return go


def run(quick: bool = False) -> list[dict]:
    import torch

    from rcomp.io.checkpoint import save
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
    return [
        row("python -c 'import torch' (s)", t_torch, command="python -c 'import torch'"),
        row("rcomp --help (s)", t_help, "< 0.3", t_help < 0.3, "python -m rcomp --help"),
        row(f"rcomp info on a {size_mb:.0f} MB checkpoint (s)", t_info, "< 0.5", t_info < 0.5,
            "python -m rcomp info resnet18.safetensors"),
        row("import torch / rcomp --help (x)", t_torch / t_help, command="ratio of the two above"),
    ]


if __name__ == "__main__":
    main(run)
