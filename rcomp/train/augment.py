"""Standard data augmentation for the built-in datasets, on batches, driven by a torch.Generator.

Random crops with zero padding (translation by up to ``pad`` pixels) and, for natural images,
horizontal flips: the usual CIFAR recipe (He et al. 2016), shifts only for digits (a flipped digit
is another symbol). Random numbers are drawn for the whole *global* batch so that distributed
training augments each example exactly as single-process training would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: dataset -> (padding in pixels, horizontal flips)
RECIPES: dict[str, tuple[int, bool]] = {
    "digits": (1, False),
    "mnist": (2, False),
    "fashion-mnist": (2, True),
    "cifar10": (4, True),
    "cifar100": (4, True),
    "svhn": (4, False),
    "fake": (2, True),
    "imagefolder": (0, True),
}

#: datasets augmented unless --no-augment (the others only with --augment)
DEFAULT_ON = ("cifar10", "cifar100", "svhn")


def recipe(dataset: str | None, height: int) -> tuple[int, bool]:
    pad, flip = RECIPES.get(dataset or "", (max(1, height // 8), False))
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
