"""The data registry: ``--data NAME`` with ``--data-dir DIR`` (default ``$RCOMP_DATA``).

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


DATASETS: dict[str, DataInfo] = {
    "digits": DataInfo("digits", 10, (1, 8, 8), (0.3051,), (0.3789,),
                       "scikit-learn's 8x8 handwritten digits, bundled, offline (1797 images)",
                       tuple(str(i) for i in range(10))),
    "mnist": DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), "MNIST via torchvision, local files",
                      tuple(str(i) for i in range(10))),
    "fashion-mnist": DataInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,),
                              "Fashion-MNIST via torchvision, local files",
                              ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                               "Sneaker", "Bag", "Ankle boot")),
    "cifar10": DataInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                        "CIFAR-10 via torchvision, local files",
                        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                         "truck")),
    "cifar100": DataInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                         "CIFAR-100 via torchvision, local files"),
    "svhn": DataInfo("svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                     "SVHN via torchvision, local files", tuple(str(i) for i in range(10))),
    "imagefolder": DataInfo("imagefolder", 0, (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                            "class sub-folders under --data-dir (DIR/train and DIR/test, else a held-out 20%); the images' own shape"),
    "fake": DataInfo("fake", 10, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     "synthetic images with a class-dependent pattern (2,000 train, 10,000 test; smoke tests)"),
}

SPLITS = ("train", "test")

#: where each torchvision dataset's files go, and where the official archives come from
_MISSING_HELP = {
    "mnist": "put MNIST's four raw files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
             "t10k-labels-idx1-ubyte, gunzipped) in {root}/MNIST/raw/; the archives are at "
             "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of http://yann.lecun.com/exdb/mnist/)",
    "fashion-mnist": "put Fashion-MNIST's four raw files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                     "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gunzipped) in {root}/FashionMNIST/raw/; "
                     "the archives are at http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) in {root} "
               "so that {root}/cifar-10-batches-py/ exists",
    "cifar100": "extract cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) in "
                "{root} so that {root}/cifar-100-python/ exists",
    "svhn": "put train_32x32.mat and test_32x32.mat (from http://ufldl.stanford.edu/housenumbers/) in {root}/",
}


def data_info(name: str) -> DataInfo:
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, list(DATASETS), n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RcompError(f"unknown dataset {name!r}{hint}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def data_root(data_dir: str | Path | None) -> Path:
    root = data_dir or os.environ.get("RCOMP_DATA")
    return Path(root).expanduser() if root else Path("data")


def get_dataset(name: str, split: str, spec, data_dir: str | Path | None = None, *, seed: int = 0,
                fake_size: int | None = None, log=None):
    """Dataset ``name``/``split`` adapted to ``spec`` (an :class:`~rcomp.spec.InputSpec`).

    ``log(message)`` receives what the user must be told (e.g. that an image folder without
    ``train/`` and ``test/`` was split into a held-out test set); commands print it on stderr."""
    info = data_info(name)
    if split not in SPLITS:
        raise RcompError(f"unknown split {split!r}; choose train or test")
    train = split == "train"
    if name == "digits":
        from rcomp.data.sources import digits

        return digits(train, spec)
    if name == "fake":
        from rcomp.data.sources import FakeImages

        n = fake_size if fake_size is not None else (2000 if train else 10000)
        return FakeImages(n, spec, info.num_classes, seed=seed + (0 if train else 1))
    root = data_root(data_dir)
    if name == "imagefolder":
        from rcomp.data.sources import image_folder

        return image_folder(root, split, spec, log)
    from rcomp.data.sources import torchvision_dataset

    return torchvision_dataset(name, root, train, spec, _MISSING_HELP[name].format(root=root))


def native_shape(name: str, data_dir: str | Path | None = None) -> tuple[tuple[int, int, int], str]:
    """The input shape ``(C, H, W)`` a model for dataset ``name`` should have, and a note saying why.

    Registered datasets have a fixed shape; for ``imagefolder`` the images' headers are inspected
    (:func:`rcomp.data.images.native_shape`). Commands use it as the default ``--input-shape``."""
    info = data_info(name)
    if name != "imagefolder":
        c, h, w = info.shape
        return info.shape, f"input shape {c}x{h}x{w}: {name}'s native shape"
    from rcomp.data.images import native_shape as folder_shape

    return folder_shape(data_root(data_dir))


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
