"""What every command shares: option types, parsing of eps/shapes, input and output paths,
stdout/stderr discipline, devices and seeds. Imports no torch at module level."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from rcomp.errors import RcompError

# ---------------------------------------------------------------------------
# config files: --config FILE.yaml supplies defaults for any option
# ---------------------------------------------------------------------------


def _load_config(ctx: typer.Context, param, value: str | None):
    if not value:
        return value
    import yaml

    path = Path(value)
    if not path.is_file():
        raise RcompError(f"config file {path} does not exist; check --config")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RcompError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise RcompError(f"config file {path} must map option names to values")
    cmd = ctx.info_name
    if isinstance(doc.get(cmd), dict):  # nested: {prune: {ratio: 0.5}}
        doc = doc[cmd]
    known = {p.name for p in ctx.command.params}
    defaults = {}
    for key, val in doc.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            raise RcompError(f"config file {path}: unknown option {key!r} for `rcomp {cmd}`")
        if isinstance(val, list):
            val = ",".join(str(v) for v in val)
        defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="YAML file of defaults for this command's options (keys as option names).",
                 callback=_load_config, is_eager=True, show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same result on CPU.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option("-o", "--output", help="Output path (default: next to the input, with a descriptive suffix).",
                 show_default=False),
]
DataOpt = Annotated[str, typer.Option("--data", help="Dataset: digits, mnist, fashion-mnist, cifar10, cifar100, svhn, "
                                                     "imagefolder or fake.")]
OptionalDataOpt = Annotated[
    str | None, typer.Option("--data", help="Dataset: digits, mnist, fashion-mnist, cifar10, cifar100, svhn, "
                                            "imagefolder or fake.", show_default=False)]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Dataset folder (default: $RCOMP_DATA, else ./data).",
                              show_default=False)]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="Name the user factory (package.module:factory) the checkpoint was made with.",
                 show_default=False),
]
TrustOpt = Annotated[bool, typer.Option("--trust-factory", help="Import the user factory a checkpoint names (only "
                                                                "for files you trust).")]
CkptArg = Annotated[
    Path | None,
    typer.Argument(help="Input checkpoint (.safetensors); read from stdin when omitted and stdin is a pipe.",
                   show_default=False),
]


# ---------------------------------------------------------------------------
# stdout / stderr
# ---------------------------------------------------------------------------

def log(msg: str) -> None:
    """Logs and progress go to stderr; stdout is kept for results and output paths."""
    print(msg, file=sys.stderr, flush=True)


def emit_path(path: Path) -> None:
    print(str(path), flush=True)


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str), flush=True)


# ---------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------

def input_checkpoint(path: Path | None) -> Path:
    """The input checkpoint: the argument, or the last path printed by an upstream command on stdin."""
    if path is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise RcompError("no input checkpoint given; pass CKPT or pipe a path from another rcomp command")
        lines = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
        if not lines:
            raise RcompError("no input checkpoint given: stdin was empty (did the upstream command fail?)")
        path = Path(lines[-1])
    path = Path(path)
    if not path.exists():
        raise RcompError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise RcompError(f"{path} is a directory; give a checkpoint file")
    return path


def default_output(inp: Path, suffix: str) -> Path:
    """``model.safetensors`` + ``prune0.5`` -> ``model.prune0.5.safetensors`` beside the input."""
    name = inp.name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else inp.stem
    return inp.with_name(f"{stem}.{suffix}.safetensors")


def resolve_output(output: Path | None, inp: Path | None, suffix: str, force: bool) -> Path:
    from rcomp.io.atomic import check_output_path

    if output is None:
        if inp is None:
            raise RcompError("give an output path with -o")
        output = default_output(inp, suffix)
    return check_output_path(output, (inp,) if inp is not None else (), force=force)


from rcomp.parsing import (  # noqa: E402,F401  (re-exported for the commands)
    parse_eps,
    parse_eps_list,
    parse_floats,
    parse_json_kwargs,
    parse_number,
    parse_shape,
)


def positive_int(value: int, what: str) -> int:
    if value is None or value < 1:
        raise RcompError(f"{what} must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------------------
# torch-side helpers (import torch lazily)
# ---------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    import torch

    d = (device or "auto").strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return "cpu"
    if re.fullmatch(r"cuda(:\d+)?", d):
        if not torch.cuda.is_available():
            raise RcompError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        idx = int(d.split(":")[1]) if ":" in d else 0
        if idx >= torch.cuda.device_count():
            raise RcompError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
        return d
    raise RcompError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def load_model(path: Path, device: str = "cpu", arch: str | None = None, trust: bool = False):
    from rcomp.io.checkpoint import load

    return load(path, device=device, factory=arch, trust_factory=trust)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
