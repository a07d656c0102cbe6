"""Turn a plain safetensors file or a PyTorch state_dict into an rcomp checkpoint.

State dicts are read with ``torch.load(weights_only=True)``: never full pickle.
"""

from __future__ import annotations

from pathlib import Path

from rcomp.errors import RcompError

_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


def read_state_dict(src: Path) -> dict:
    import torch

    from rcomp.io.bounded import open_regular
    from rcomp.io.header import read_header
    from rcomp.text import printable

    src = Path(src)
    with open_regular(src, "input") as (fh, _size):
        head = fh.read(9)
    # safetensors: 8-byte little-endian length followed by '{'
    looks_safetensors = len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < (1 << 31) and head[8:] == b"{"
    if looks_safetensors:
        read_header(src)  # validates
        from rcomp.io.serialize import load_tensors

        sd = load_tensors(src)
    else:
        try:
            obj = torch.load(str(src), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for hostile files
            first = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise RcompError(f"{printable(str(src))} is neither safetensors nor a weights-only PyTorch state_dict ({first}); "
                             "rcomp never unpickles arbitrary objects") from None
        sd = obj
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
        if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise RcompError(f"{printable(str(src))} does not hold a state_dict (a mapping of names to tensors)")
    return dict(sd)


def strip_prefixes(sd: dict, expected: set[str]) -> dict:
    """Strip ``module.``/``model.`` style prefixes until the keys match the expected names."""
    changed = True
    while changed and not set(sd) <= expected:
        changed = False
        for p in _PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def convert_state_dict(src: Path, arch: str, num_classes: int | None = None,
                       input_shape: tuple[int, int, int] | None = None, mean=None, std=None,
                       arch_kwargs: dict | None = None, dataset: str | None = None, class_names=None):
    """Build ``arch`` and load ``src``'s weights into it; returns a Classifier."""
    import torch

    from rcomp.models.registry import build_model

    sd = read_state_dict(src)
    if num_classes is None:
        probe = build_model(arch, 10, input_shape, mean, std, arch_kwargs)
        last = [n for n, m in probe.net.named_modules() if isinstance(m, torch.nn.Linear)]
        key = f"{last[-1]}.weight" if last else None
        sd_probe = strip_prefixes(sd, set(probe.net.state_dict()))
        if key is None or key not in sd_probe:
            raise RcompError("cannot infer the number of classes; pass --num-classes N")
        num_classes = int(sd_probe[key].shape[0])
    model = build_model(arch, num_classes, input_shape, mean, std, arch_kwargs, dataset=dataset,
                        class_names=class_names)
    expected = model.net.state_dict()
    sd = strip_prefixes(sd, set(expected))
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise RcompError(f"{src} does not fit {arch}: {'; '.join(parts)}; check --arch")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise RcompError(f"{src} does not fit {arch}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
                             + ("; check --num-classes" if k.endswith(("fc.weight", "fc.bias", "classifier.weight")) else ""))
    from rcomp.models.loading import with_versions

    state = with_versions({k: sd[k].to(expected[k].dtype) for k in expected}, expected)
    model.net.load_state_dict(state, strict=True)
    model.eval()
    return model
