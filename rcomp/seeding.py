"""Seeds for every random choice in rcomp: one place that derives them, so runs are reproducible.

Every random draw (validation split, shuffling, augmentation, attack starts and targets) comes
from a ``torch.Generator`` seeded with a number derived here from the user's ``--seed`` and the
position of the draw (epoch, step, batch, attack call, restart). The same seed therefore gives
the same draws on one machine, whatever ran before.

* :func:`derive_seed` folds integers into one seed (training: ``(seed, epoch, step, rank)``);
* :func:`stream_seed` is an attack's seed for random stream ``stream`` of its ``call``-th call;
* :func:`generator` builds a generator seeded with a seed.
"""

from __future__ import annotations

from typing import Any

_MULT = 1_000_003


def derive_seed(*parts: int) -> int:
    """Fold ``parts`` into one seed in [0, 2**62): ``s = (s * 1000003 + p) mod 2**62`` from ``s = 0``."""
    s = 0
    for p in parts:
        s = (s * _MULT + int(p)) % (2**62)
    return s


def stream_seed(seed: int, call: int, stream: int) -> int:
    """The seed of random stream ``stream`` of an attack's ``call``-th call (see ``Attack.generator``).

    Each (call, stream) pair gets its own seed, so what restart ``r`` of batch ``b`` draws does
    not depend on how many restarts earlier batches used.
    """
    return (seed * _MULT + call * 10_007 + stream + 1) % (2**63 - 1)


def generator(seed: int, device: Any = "cpu"):
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))
