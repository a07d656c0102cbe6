"""Which points a figure covers: ``-n N``, ``--eval-n N``, ``--calib-n N`` and ``finetune -n N``.

One rule for every command, dataset and model: a subset of N points of a split is a **stratified
sample** of the whole split, drawn with the fixed seed :data:`SUBSET_SEED` (not the run's
``--seed``), so two models benchmarked separately, or ``attack`` and ``bench`` on the same model,
see the same points. Each class gets its share of N (largest remainder, ties to the lower class
index); within a class the points are a seeded random choice (the class's own stream). The
indices come back in dataset order. N at least the split's size means the whole split.

A dataset whose labels cannot be read without decoding every image gets a seeded shuffle instead
(``sampling: shuffled``). :func:`describe` records what a figure covers: ``n``, ``of``, the count
per class, the sampling and its seed; reports and histories carry it.

Imports torch only inside functions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

#: the seed of every subset, whatever --seed says (so separately run models see the same points)
SUBSET_SEED = 0


def labels_of(ds, computed: bool = True) -> list[int] | None:
    """Every label of ``ds`` in index order, read without decoding images; None when that cannot be done.
    ``computed=False`` skips datasets that compute each label (synthetic ones: about 30 us a label)."""
    from torch.utils.data import Subset

    if isinstance(ds, Subset):
        base = labels_of(ds.dataset, computed)
        return None if base is None else [base[i] for i in ds.indices]
    every = getattr(ds, "all_labels", None)  # FakeImages: computes labels without their images
    if callable(every):
        return list(every()) if computed else None
    labels = getattr(ds, "labels", None)
    if labels is None and hasattr(ds, "samples"):  # image files: (path, label)
        return [int(s[1]) for s in ds.samples]
    base = getattr(ds, "base", None)  # a torchvision dataset wrapped by AdaptedDataset
    if labels is None and base is not None:
        labels = getattr(base, "targets", None)
        if labels is None:
            labels = getattr(base, "labels", None)  # SVHN
    if labels is None:
        return None
    out = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    return [int(v) for v in out] if len(out) == len(ds) else None


def stratified_indices(labels: Sequence[int], n: int, seed: int = SUBSET_SEED) -> list[int]:
    """``n`` indices of ``labels``: each class's proportional share (largest remainder), a seeded
    random choice within each class, returned in ascending order. All indices when ``n >= len``."""
    total = len(labels)
    if n >= total:
        return list(range(total))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    classes = sorted(by_class)
    exact = {c: n * len(by_class[c]) / total for c in classes}
    quota = {c: int(exact[c]) for c in classes}
    left = n - sum(quota.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - quota[c]), c))[:left]:
        quota[c] += 1
    chosen: list[int] = []
    for c in classes:
        items = list(by_class[c])
        random.Random(seed * 1_000_003 + c).shuffle(items)
        chosen += items[:quota[c]]
    return sorted(chosen)


def shuffled_indices(total: int, n: int, seed: int = SUBSET_SEED) -> list[int]:
    """``n`` of ``range(total)`` by a seeded shuffle, in ascending order (labels unknown)."""
    if n >= total:
        return list(range(total))
    idx = list(range(total))
    random.Random(seed).shuffle(idx)
    return sorted(idx[:n])


def choose(ds, n: int | None, seed: int = SUBSET_SEED) -> tuple[list[int], dict[str, Any]]:
    """``(indices, points)``: the points of ``ds`` a figure on ``n`` of them covers, and their description."""
    total = len(ds)
    k = total if n is None else min(int(n), total)
    labels = labels_of(ds, computed=k < total)
    if k >= total:
        idx, sampling = list(range(total)), "all"
    elif labels is not None:
        idx, sampling = stratified_indices(labels, k, seed), "stratified"
    else:
        idx, sampling = shuffled_indices(total, k, seed), "shuffled"
    return idx, describe(idx, labels, total, sampling, seed, getattr(ds, "num_classes", None))


def describe(idx: Sequence[int], labels: Sequence[int] | None, total: int, sampling: str, seed: int = SUBSET_SEED,
             num_classes: int | None = None) -> dict[str, Any]:
    """``{"n", "of", "sampling", "seed", "per_class"}``; ``per_class[c]`` counts class ``c`` (None if unknown)."""
    per_class = None
    if labels is not None:
        width = max([num_classes or 0, *[int(labels[i]) + 1 for i in idx]]) if idx else (num_classes or 0)
        per_class = [0] * width
        for i in idx:
            per_class[int(labels[i])] += 1
    return {"n": len(idx), "of": total, "sampling": sampling, "seed": None if sampling == "all" else seed,
            "per_class": per_class}


def points_text(points: dict[str, Any] | None) -> str:
    """``100 of 360 points (stratified sample, seed 0; per class 10,10,...)`` for logs and report footers."""
    if not points:
        return ""
    what = "all" if points["sampling"] == "all" else f"{points['sampling']} sample, subset seed {points['seed']}"
    pc = points.get("per_class")
    if pc:
        counts = ",".join(map(str, pc)) if len(pc) <= 20 else f"{min(pc)}..{max(pc)}"
        what += f"; per class {counts}"
    return f"{points['n']} of {points['of']} points ({what})"
