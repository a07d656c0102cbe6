"""Clean accuracy, and batches of a dataset subset: the accuracy figures outside ``rcomp bench``.

Every accuracy goes through :func:`rcomp.evaluation.robustness.evaluate` (the one evaluation
loop): :func:`clean_accuracy` is that loop with no attack. :func:`batches` turns a dataset and a
list of indices into the batches the loop reads, and :class:`PerBatchAttack` lets a caller give
each batch its own seeded attack (training's validation and test figures).

>>> correct, n = clean_accuracy(model, loader)                      # doctest: +SKIP
>>> correct, n = clean_accuracy(model, batches(test_ds, range(500), 128))   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
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


class PerBatchAttack:
    """Attack each batch of :meth:`loader` as a whole, with an attack built for that batch.

    :func:`~rcomp.evaluation.robustness.evaluate` hands an attack only the points of a batch
    classified correctly clean; this wrapper attacks the whole batch (``make(key)`` builds the
    attack for the batch's ``key``, e.g. a seed) and returns the rows ``evaluate`` asked for, so
    what a point's attack draws does not depend on which other points were correct.
    """

    def __init__(self, make: Callable[[Any], Any], norm: str = "linf"):
        self.make, self.norm = make, norm
        self._current: tuple[Any, Any, Any] | None = None
        self._params: dict[str, Any] = {}

    def loader(self, keyed: Iterable[tuple[Any, Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """Yield ``(x, y)`` from ``(x, y, key)`` items, remembering the batch for :meth:`__call__`."""
        for x, y, key in keyed:
            self._current = (x, y, key)
            yield x, y

    def __call__(self, model, xs, ys):
        import torch

        x, y, key = self._current
        attack = self.make(key)
        self._params = attack.params() if hasattr(attack, "params") else {}
        x_adv = attack(model, x, y)
        with torch.inference_mode():
            ok = model(x).argmax(1) == y
        return x_adv[ok]

    def params(self) -> dict[str, Any]:
        return dict(self._params)
