"""The data registry: ``--data NAME`` with ``--data-dir DIR`` (default ``$RCOMP_DATA``); the datasets
are listed in :data:`rcomp.data.catalog.DATASETS` (plus installed ``rcomp.datasets`` plugins).

* ``digits``: scikit-learn's bundled 8x8 digits (offline), fixed seeded 80/20 train/test split;
* ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision on local files,
  never downloading;
* ``imagefolder``: class sub-folders under ``--data-dir`` (or ``--data-dir/train`` and ``/test``);
* ``fake``: synthetic images with a class-dependent pattern, for smoke tests.

Every dataset yields ``(image, label)`` with ``image`` a float tensor of the model's input shape
in [0, 1]; normalisation is the model's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rcomp.data.catalog import DATASETS
from rcomp.errors import RcompError


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    help: str
    classes: tuple[str, ...] | None = None


SPLITS = ("train", "test")


def data_info(name: str) -> DataInfo:
    """What commands need to know of dataset ``name`` before loading it (its catalogue entry's facts)."""
    e = DATASETS.get(name)
    x = e.extra
    try:
        return DataInfo(e.name, int(x["num_classes"]), tuple(x["shape"]), tuple(x["mean"]), tuple(x["std"]), e.help,
                        tuple(x["classes"]) if x.get("classes") else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise RcompError(f"dataset {name!r} ({e.plugin or 'rcomp'}) does not declare num_classes, shape, mean "
                         f"and std ({type(exc).__name__}); fix its catalogue entry") from None


def data_root(data_dir: str | Path | None) -> Path:
    root = data_dir or os.environ.get("RCOMP_DATA")
    return Path(root).expanduser() if root else Path("data")


def get_dataset(name: str, split: str, spec, data_dir: str | Path | None = None, *, seed: int = 0,
                fake_size: int | None = None, log=None):
    """Dataset ``name``/``split`` adapted to ``spec`` (an :class:`~rcomp.spec.InputSpec`).

    ``log(message)`` receives what the user must be told (e.g. that an image folder without
    ``train/`` and ``test/`` was split into a held-out test set); commands print it on stderr."""
    data_info(name)
    if split not in SPLITS:
        raise RcompError(f"unknown split {split!r}; choose train or test")
    entry = DATASETS.get(name)
    return entry.load()(entry, split == "train", spec, data_root(data_dir), seed=seed, fake_size=fake_size, log=log)


def native_shape(name: str, data_dir: str | Path | None = None) -> tuple[tuple[int, int, int], str]:
    """The input shape ``(C, H, W)`` a model for dataset ``name`` should have, and a note saying why.

    Registered datasets have a fixed shape; for ``imagefolder`` the images' headers are inspected
    (:func:`rcomp.data.images.native_shape`). Commands use it as the default ``--input-shape``."""
    info = data_info(name)
    inspect = DATASETS.get(name).get("native_shape")
    if not inspect:
        c, h, w = info.shape
        return info.shape, f"input shape {c}x{h}x{w}: {name}'s native shape"
    from rcomp.catalog import Entry

    return Entry("native_shape", inspect).load()(data_root(data_dir))


def dataset_classes(ds) -> int:
    n = getattr(ds, "num_classes", None)
    if n is None:
        raise RcompError("dataset does not say how many classes it has")
    return n


def check_fits(ds, num_classes: int, data_name: str) -> None:
    """A dataset whose labels do not fit the model's outputs is refused."""
    n = dataset_classes(ds)
    if n > num_classes:
        raise RcompError(
            f"dataset {data_name} has {n} classes but the model outputs {num_classes}; "
            "use a model made for this dataset"
        )


def make_loader(ds, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0, n: int | None = None,
                drop_last: bool = False, sampler=None):
    """A DataLoader over the first ``n`` items of ``ds`` (all if None), deterministic with ``seed``."""
    import torch
    from torch.utils.data import DataLoader, Subset

    if n is not None:
        if n < 1:
            raise RcompError(f"-n must be at least 1, got {n}")
        if n < len(ds):
            ds = _subset(ds, n) if hasattr(ds, "subset") else Subset(ds, range(n))
    if batch_size < 1:
        raise RcompError(f"--batch-size must be at least 1, got {batch_size}")
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle if sampler is None else False, generator=g,
                      num_workers=0, drop_last=drop_last, sampler=sampler)


def _subset(ds, n):
    return ds.subset(range(n))
