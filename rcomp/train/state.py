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
import math
from pathlib import Path
from typing import Any

import torch

from rcomp.errors import RcompError
from rcomp.text import printable

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
            idx, name = _optim_key(k, where)
            state.setdefault(idx, {})[name] = v
    _check_optim_shapes(optimizer, state, where)
    none = info.get("optim_none", [])
    if not isinstance(none, list) or not all(
            isinstance(e, list) and len(e) == 2 and _whole(e[0]) and isinstance(e[1], str) for e in none):
        raise RcompError(f"--resume {where}: the state's optimizer entries are malformed; {_FIX}")
    for idx, name in none:
        state.setdefault(int(idx), {})[name] = None
    groups = check_param_groups(info.get("param_groups"), optimizer, where)
    before = optimizer.state_dict()
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        optimizer.load_state_dict(before)
        raise RcompError(f"--resume {where}: the optimizer state does not fit this optimizer "
                         f"({type(exc).__name__}); use the same --optimizer and model, or {_FIX}") from None
    torch.set_rng_state(tensors["rng.torch"])


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1_000_000


def _optim_key(key: str, where: str) -> tuple[int, str]:
    """``optim.<index>.<buffer>`` -> (index, buffer name); anything else is refused."""
    parts = key.split(".", 2)
    if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()) or len(parts[1]) > 6 or not parts[2]:
        raise RcompError(f"--resume {where}: the state holds a malformed optimizer tensor name "
                         f"{printable(repr(key), 80)}; {_FIX}")
    return int(parts[1]), parts[2]


def _same_kind(saved: Any, current: Any) -> bool:
    """``saved`` (from the state's JSON) has the type of ``current`` (the optimizer's own value)."""
    if isinstance(current, bool) or current is None:
        return saved is current or (isinstance(saved, bool) and isinstance(current, bool))
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(current, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(current) and all(
            _same_kind(a, b) for a, b in zip(saved, current, strict=True))
    return isinstance(saved, type(current))


def check_param_groups(groups: Any, optimizer, where: str) -> list[dict[str, Any]]:
    """The state's param_groups, checked against the optimizer's: same groups and keys, every value of the
    same kind (a learning rate that is text, NaN or a list is refused), and the same parameters."""
    current = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(current) or not all(isinstance(g, dict) for g in groups):
        raise RcompError(f"--resume {where}: the state's optimizer settings (param_groups) are malformed or for "
                         f"another optimizer; use the same --optimizer, or {_FIX}")
    for saved, cur in zip(groups, current, strict=True):
        if set(saved) != set(cur):
            raise RcompError(f"--resume {where}: the state's optimizer settings have keys "
                             f"{printable(sorted(map(str, saved))[:8], 120)}, this --optimizer "
                             f"{printable(sorted(cur)[:8], 120)}; use the same --optimizer, or {_FIX}")
        for key, value in saved.items():
            if key == "params":
                ok = isinstance(value, list) and value == list(cur["params"])
            else:
                ok = _same_kind(value, cur[key]) and not (key == "lr" and not (isinstance(value, (int, float))
                                                                            and 0 <= value <= 1e3))
            if not ok:
                raise RcompError(f"--resume {where}: the state's optimizer setting {printable(key, 40)} is "
                                 f"{printable(repr(value), 60)}, not a value of its kind; the state is damaged or "
                                 f"edited: {_FIX}")
    return groups


def _check_optim_shapes(optimizer, state: dict[int, dict[str, Any]], where: str) -> None:
    """Each saved buffer belongs to a parameter and is a scalar (a step count) or has its shape."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, bufs in state.items():
        if not 0 <= idx < len(params):
            raise RcompError(f"--resume {where}: optimizer state for parameter {idx}, but the model has "
                             f"{len(params)}; use the same --optimizer and model")
        for name, v in bufs.items():
            if not v.is_floating_point() and v.numel() > 1:
                raise RcompError(f"--resume {where}: optimizer buffer {printable(name, 40)} of parameter {idx} holds "
                                 f"{str(v.dtype).replace('torch.', '')} values, not floats; {_FIX}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise RcompError(f"--resume {where}: optimizer buffer {printable(name, 40)} of parameter {idx} holds "
                                 f"NaN or infinite values; {_FIX}")
            if v.numel() > 1 and tuple(v.shape) != tuple(params[idx].shape):
                raise RcompError(f"--resume {where}: optimizer buffer {name} of parameter {idx} has shape "
                                 f"{tuple(v.shape)}, the parameter {tuple(params[idx].shape)}; {_FIX}")
