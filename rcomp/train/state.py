"""Resumable training state without pickle: one safetensors file.

Tensors: ``model.*`` (the trained module's state_dict), ``optim.<i>.<key>`` (per-parameter
optimizer buffers) and ``rng.torch`` (the global CPU generator). The header's
``rcomp.train_state`` holds JSON: epochs done, global step, the optimizer's param_groups, the
per-epoch metrics so far, and a fingerprint of the options that must match on ``--resume``.
Nothing is ever unpickled, so a state file from elsewhere is as safe to load as a checkpoint.

A state is checked like a checkpoint before anything is restored: the header holds a SHA-256
digest of its JSON and every tensor (names, dtypes, shapes and bytes), verified on reading; the epoch must be
a whole number within the run; every model tensor must have the model's shape and every
optimizer buffer its parameter's shape. A corrupt or edited state is refused with one line
(exit 2), never resumed into a wrong run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rcomp.errors import RcompError

KEY = "rcomp.train_state"
VERSION = 2
_FIX = "delete it and train again without --resume"


def state_digest(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> str:
    """SHA-256 over the state's JSON (without its digest), then every tensor's name, dtype, shape
    and bytes, in name order."""
    import hashlib

    h = hashlib.sha256(json.dumps({k: v for k, v in doc.items() if k != "digest"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    doc = json.loads(json.dumps(dict(info, version=VERSION, param_groups=osd["param_groups"], optim_none=none_keys)))
    doc["digest"] = state_digest(tensors, doc)
    atomic_write_bytes(Path(path), save(tensors, metadata={KEY: json.dumps(doc)}))


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a state file: (info JSON, tensors). Refuses anything that is not one."""
    from rcomp.io.header import read_header
    from rcomp.io.serialize import load_tensors

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
    if not isinstance(info, dict) or info.get("version") != VERSION:
        version = info.get("version") if isinstance(info, dict) else None
        raise RcompError(f"--resume {path}: unsupported training state version {version!r}; {_FIX}")
    epoch = info.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= 1_000_000:
        raise RcompError(f"--resume {path}: the state's epoch {epoch!r} is not a whole number >= 1; {_FIX}")
    if not isinstance(info.get("history"), list) or len(info["history"]) != epoch:
        raise RcompError(f"--resume {path}: the state's history does not match its epoch {epoch}; {_FIX}")
    tensors = load_tensors(path)
    if info.get("digest") != state_digest(tensors, info):
        raise RcompError(f"--resume {path}: the state does not match its digest (corrupt or edited); {_FIX}")
    if tensors.get("rng.torch") is None or tensors["rng.torch"].dtype != torch.uint8:
        raise RcompError(f"--resume {path}: the state has no valid random generator state; {_FIX}")
    return info, tensors


def restore(model, optimizer, info: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Check that the state fits ``model`` and ``optimizer``, then put weights, buffers and RNG state back."""
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    want = model.state_dict()
    for k, v in msd.items():
        if k in want and tuple(v.shape) != tuple(want[k].shape):
            raise RcompError(f"--resume {where} does not fit this model: {k} has shape {tuple(v.shape)}, the "
                             f"model {tuple(want[k].shape)}; resume with the same input checkpoint or --arch")
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
    _check_optim_shapes(optimizer, state, where)
    for idx, name in info.get("optim_none", []):
        state.setdefault(int(idx), {})[name] = None
    try:
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise RcompError(f"--resume {where}: optimizer state does not fit ({exc}); use the same --optimizer") from None
    torch.set_rng_state(tensors["rng.torch"])


def _check_optim_shapes(optimizer, state: dict[int, dict[str, Any]], where: str) -> None:
    """Each saved buffer belongs to a parameter and is a scalar (a step count) or has its shape."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, bufs in state.items():
        if not 0 <= idx < len(params):
            raise RcompError(f"--resume {where}: optimizer state for parameter {idx}, but the model has "
                             f"{len(params)}; use the same --optimizer and model")
        for name, v in bufs.items():
            if v.numel() > 1 and tuple(v.shape) != tuple(params[idx].shape):
                raise RcompError(f"--resume {where}: optimizer buffer {name} of parameter {idx} has shape "
                                 f"{tuple(v.shape)}, the parameter {tuple(params[idx].shape)}; {_FIX}")
