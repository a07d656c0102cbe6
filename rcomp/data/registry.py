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


def check_data(name: str, data_dir: str | Path | None = None) -> None:
    """Refuse a dataset choice that cannot work, before any model loads (no torch): an unknown name,
    ``imagefolder`` without a folder, a folder that does not exist, or one class's folder given
    instead of the folder of class sub-folders."""
    data_info(name)
    if name != "imagefolder":
        return
    if not (data_dir or os.environ.get("RCOMP_DATA")):
        raise RcompError("--data imagefolder needs --data-dir DIR (a folder with one sub-folder of images per class, "
                         "or DIR/train and DIR/test)")
    root = data_root(data_dir)
    if not root.is_dir():
        raise RcompError(f"--data-dir {root} does not exist or is not a folder; give the folder that holds one "
                         "sub-folder per class")
    from rcomp.data.images import EXTENSIONS

    try:
        entries = list(os.scandir(root))
    except OSError as exc:
        raise RcompError(f"cannot read --data-dir {root}: {exc.strerror or exc}") from None
    has_dirs = any(e.is_dir() for e in entries)
    images = [e.name for e in entries if e.is_file() and Path(e.name).suffix.lower() in EXTENSIONS]
    if images and not has_dirs:
        raise RcompError(f"--data-dir {root} holds images but no class sub-folders: it looks like one class's "
                         f"folder; give its parent ({root.parent}), which has one sub-folder per class")
    if not has_dirs:
        raise RcompError(f"--data-dir {root} has no class sub-folders; put each class's images in DIR/CLASS/")


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
    """A DataLoader over ``n`` items of ``ds`` (all if None), deterministic with ``seed``.

    ``n`` items are a stratified sample of the whole split with the fixed subset seed
    (:mod:`rcomp.data.subset`), the same for every command and model; never the first ``n``.
    The loader's ``points`` attribute describes them (count, per-class counts, sampling, seed)."""
    import torch
    from torch.utils.data import DataLoader

    from rcomp.data.subset import choose

    if n is not None and n < 1:
        raise RcompError(f"-n must be at least 1, got {n}")
    if batch_size < 1:
        raise RcompError(f"--batch-size must be at least 1, got {batch_size}")
    idx, points = choose(ds, n)
    subset = len(idx) < len(ds)
    if subset:
        ds = take(ds, idx)
    g = torch.Generator()
    g.manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle if sampler is None else False, generator=g,
                        num_workers=0, drop_last=drop_last, sampler=sampler)
    loader.points = points
    # the dataset index of each item in loader order (records and -o files name points by it); None: 0, 1, ...
    loader.indices = [int(i) for i in idx] if subset and not shuffle and sampler is None else None
    return loader


def take(ds, idx):
    """The items ``idx`` of ``ds`` as a dataset (``ds.subset`` where it has one), keeping ``num_classes``."""
    from torch.utils.data import Subset

    if hasattr(ds, "subset"):
        return ds.subset(idx)
    sub = Subset(ds, list(idx))
    sub.num_classes = getattr(ds, "num_classes", None)
    sub.classes = getattr(ds, "classes", None)
    return sub


def subset(ds, n: int | None):
    """``(dataset, points)``: ``n`` items of ``ds`` chosen as :func:`make_loader` chooses them."""
    from rcomp.data.subset import choose

    idx, points = choose(ds, n)
    return (take(ds, idx) if len(idx) < len(ds) else ds), points
