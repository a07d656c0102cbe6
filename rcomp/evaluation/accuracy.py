"""Clean accuracy, and batches of a dataset subset: the accuracy figures outside ``rcomp bench``.

Every accuracy goes through :func:`rcomp.evaluation.robustness.evaluate` (the one evaluation
loop): :func:`clean_accuracy` is that loop with no attack. :func:`batches` turns a dataset and a
list of indices into the batches the loop reads (a caller that gives each batch its own seeded
attack, as training's validation does, uses :class:`rcomp.evaluation.robustness.PerBatch`).

>>> correct, n = clean_accuracy(model, loader)                      # doctest: +SKIP
>>> correct, n = clean_accuracy(model, batches(test_ds, range(500), 128))   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def fetch(ds, idx: Sequence[int], device: str = "cpu"):
    """Images and labels ``ds[idx]`` as two tensors on ``device`` (fast path for in-memory datasets)."""
    import torch

    images = getattr(ds, "images", None)
    if isinstance(images, torch.Tensor) and not isinstance(ds, torch.utils.data.Subset):
        t = torch.as_tensor(list(idx), dtype=torch.long)
        x, y = images[t], ds.labels[t]
    else:
        items = [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
    return x.to(device), y.to(device)


def batches(ds, idx: Iterable[int], batch_size: int, device: str = "cpu") -> Iterator[tuple[Any, Any]]:
    """``(x, y)`` batches of ``ds[idx]`` in the order of ``idx``, ``batch_size`` at a time."""
    idx = list(idx)
    for s in range(0, len(idx), batch_size):
        yield fetch(ds, idx[s:s + batch_size], device)


def clean_accuracy(model, loader: Iterable, device: str = "cpu") -> tuple[int, int]:
    """``(correct, n)``: how many of the ``n`` images in ``loader`` ``model`` classifies correctly.

    ``loader`` yields ``(images, labels)`` (a DataLoader, or :func:`batches`); the model runs in
    eval mode under inference mode and is left in the mode it came in.
    """
    from rcomp.evaluation.robustness import evaluate

    res = evaluate(model, loader, {}, device, progress=False)
    return round(res.clean_acc * res.n), res.n
