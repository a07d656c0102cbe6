"""Standard data augmentation for the built-in datasets, on batches, driven by a torch.Generator.

Random crops with zero padding (translation by up to ``pad`` pixels) and, for natural images,
horizontal flips: the usual CIFAR recipe (He et al. 2016), shifts only for digits (a flipped digit
is another symbol). Random numbers are drawn for the whole *global* batch so that distributed
training augments each example exactly as single-process training would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _entry(dataset: str | None):
    from rcomp.data.catalog import DATASETS

    if not dataset or dataset not in DATASETS:
        return None
    try:
        return DATASETS.get(dataset)
    except Exception:  # noqa: BLE001 - a broken plugin was warned about where it is used
        return None


def default_on(dataset: str | None) -> bool:
    """Whether training on ``dataset`` augments unless --no-augment (its catalogue entry says)."""
    e = _entry(dataset)
    return bool(e is not None and e.get("augment_default"))


def recipe(dataset: str | None, height: int) -> tuple[int, bool]:
    """(padding of random crops, horizontal flips) for ``dataset`` (its catalogue entry's ``augment``)."""
    e = _entry(dataset)
    aug = e.get("augment") if e is not None else None
    pad, flip = tuple(aug) if aug else (max(1, height // 8), False)
    return pad, flip


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int, flip: bool, global_n: int | None = None,
                  offset: int = 0) -> torch.Tensor:
    """Randomly translate (and flip) each image of ``x`` (N, C, H, W); values stay in [0, 1].

    ``global_n``/``offset``: ``x`` is rows ``offset:offset+N`` of a global batch of ``global_n``.
    """
    n = x.shape[0]
    g_n = global_n or n
    shifts = torch.randint(0, 2 * pad + 1, (g_n, 2), generator=gen)[offset:offset + n] if pad else None
    flips = (torch.rand(g_n, generator=gen) < 0.5)[offset:offset + n] if flip else None
    out = x
    if pad:
        h, w = x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad))
        out = torch.stack([padded[i, :, int(s[0]):int(s[0]) + h, int(s[1]):int(s[1]) + w]
                           for i, s in enumerate(shifts)])
    if flip:
        out = torch.where(flips.view(-1, 1, 1, 1).to(out.device), out.flip(-1), out)
    return out.contiguous()
