"""Resumable training state without pickle: one safetensors file.

Tensors: ``model.*`` (the trained module's state_dict), ``optim.<i>.<key>`` (per-parameter
optimizer buffers) and ``rng.torch`` (the global CPU generator). The header's
``rcomp.train_state`` holds JSON: epochs done, global step, the optimizer's param_groups, the
per-epoch metrics so far, and a fingerprint of the options that must match on ``--resume``.
Nothing is ever unpickled, so a state file from elsewhere is as safe to load as a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rcomp.errors import RcompError

KEY = "rcomp.train_state"
VERSION = 1


def save_state(path: Path, model, optimizer, info: dict[str, Any]) -> None:
    """Atomically write the state (overwrites an earlier state at ``path``)."""
    from safetensors.torch import save

    from rcomp.io.atomic import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().to("cpu").clone().contiguous()
    osd = optimizer.state_dict()
    none_keys = []
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().to("cpu").clone().contiguous()
            elif v is None:
                none_keys.append([idx, k])
            else:
                tensors[f"optim.{idx}.{k}"] = torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state().clone()
    doc = dict(info, version=VERSION, param_groups=osd["param_groups"], optim_none=none_keys)
    atomic_write_bytes(Path(path), save(tensors, metadata={KEY: json.dumps(doc)}))


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a state file: (info JSON, tensors). Refuses anything that is not one."""
    from rcomp.io.checkpoint import load_tensors
    from rcomp.io.header import read_header

    path = Path(path)
    if not path.is_file():
        raise RcompError(f"--resume {path} does not exist; give the state file written by --save-every")
    meta = read_header(path).metadata or {}
    if KEY not in meta:
        raise RcompError(f"--resume {path} is not a training state (written by rcomp finetune --save-every)")
    try:
        info = json.loads(meta[KEY])
    except json.JSONDecodeError:
        raise RcompError(f"--resume {path}: malformed training state metadata") from None
    if info.get("version") != VERSION:
        raise RcompError(f"--resume {path}: unsupported training state version {info.get('version')!r}")
    return info, load_tensors(path)


def restore(model, optimizer, info: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put the saved weights, optimizer buffers and RNG state back."""
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(msd, strict=True)
    except RuntimeError as exc:
        raise RcompError(f"--resume {where} does not fit this model ({str(exc).splitlines()[0][:160]}); "
                         "resume with the same input checkpoint or --arch") from None
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, name in info.get("optim_none", []):
        state.setdefault(int(idx), {})[name] = None
    try:
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise RcompError(f"--resume {where}: optimizer state does not fit ({exc}); use the same --optimizer") from None
    torch.set_rng_state(tensors["rng.torch"])
