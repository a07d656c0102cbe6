"""The dataset implementations behind :mod:`rcomp.data.registry`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from rcomp.data.adapt import adapt_images
from rcomp.errors import RcompError

_digits_cache: dict = {}


#: a bundled split adapted to the model's input is held in memory up to this size; above it each image is
#: adapted when read (a checkpoint recording 3x8192x8192 asked for 290 GB of digits at once)
EAGER_BYTES = 256 * 1024**2


class TensorImages(Dataset):
    """Small datasets held in memory, adapted to the input spec: all at once, or image by image when ``spec``
    is given (the adapted split would exceed :data:`EAGER_BYTES`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, classes=None, spec=None):
        self.images, self.labels, self.num_classes, self.classes = images, labels, num_classes, classes
        self.spec = spec  # None: ``images`` are adapted already

    @classmethod
    def adapted(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, classes, spec) -> TensorImages:
        c, h, w = spec.shape
        if len(images) * c * h * w * 4 <= EAGER_BYTES:
            return cls(adapt_images(images, spec), labels, num_classes, classes)
        return cls(images, labels, num_classes, classes, spec=spec)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if self.spec is None:
            return self.images[i], self.labels[i]
        return adapt_images(self.images[i:i + 1], self.spec)[0], self.labels[i]

    def subset(self, idx):
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        return TensorImages(self.images[idx], self.labels[idx], self.num_classes, self.classes, self.spec)


def digits(train: bool, spec) -> TensorImages:
    """scikit-learn's bundled 8x8 digits; a fixed permutation (seed 0) puts 360 images in test."""
    if "raw" not in _digits_cache:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise RcompError("the digits dataset needs scikit-learn: pip install 'rcomp[digits]'") from None
        import numpy as np

        d = load_digits()
        x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
        _digits_cache["raw"] = (x[perm], y[perm])
    x, y = _digits_cache["raw"]
    n_test = 360
    x, y = (x[n_test:], y[n_test:]) if train else (x[:n_test], y[:n_test])
    return TensorImages.adapted(x, y.clone(), 10, tuple(str(i) for i in range(10)), spec)


class FakeImages(Dataset):
    """Synthetic images: each image is computed from (seed, index), so memory stays flat for any n.

    A class-dependent pattern plus noise makes the task learnable (useful for smoke tests).
    """

    def __init__(self, n: int, spec, num_classes: int = 10, seed: int = 0):
        self.n, self.spec, self.num_classes, self.seed = n, spec, num_classes, seed
        self.classes = tuple(f"class{i}" for i in range(num_classes))
        g = torch.Generator().manual_seed(12345)
        self.patterns = torch.rand((num_classes, *spec.shape), generator=g)

    def __len__(self) -> int:
        return self.n

    def label(self, i: int) -> int:
        """The label of image ``i``, without making the image (the first draw of its stream)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return int(torch.randint(self.num_classes, (1,), generator=g))

    _labels_cache: dict = {}

    def all_labels(self) -> list[int]:
        """Every label (computed once per size, seed and class count: they do not depend on the spec)."""
        key = (self.n, self.seed, self.num_classes)
        if key not in FakeImages._labels_cache:
            FakeImages._labels_cache[key] = [self.label(i) for i in range(self.n)]
        return FakeImages._labels_cache[key]

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        y = int(torch.randint(self.num_classes, (1,), generator=g))
        noise = torch.rand(self.spec.shape, generator=g)
        x = (0.6 * self.patterns[y] + 0.4 * noise).clamp(0, 1)
        return x, y


class AdaptedDataset(Dataset):
    """Wraps a torchvision dataset of PIL images or tensors and adapts each image to the spec."""

    def __init__(self, base, spec, num_classes: int, classes=None):
        self.base, self.spec, self.num_classes, self.classes = base, spec, num_classes, classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        from torchvision.transforms.functional import pil_to_tensor

        try:
            img, label = self.base[i]
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for corrupt files
            path = getattr(self.base, "samples", [(None,)] * (i + 1))[i][0] if hasattr(self.base, "samples") else i
            raise RcompError(f"cannot read image {path}: {exc}; remove or replace the file") from None
        if not isinstance(img, torch.Tensor):
            img = pil_to_tensor(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
        x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        return adapt_images(x, self.spec), int(label)


def load_torchvision(entry, train: bool, spec, root: Path, **_):
    """A torchvision dataset from local files (``entry.extra["torchvision"]`` names its class); never downloads."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, entry.get("torchvision"))
    split = {"split": "train" if train else "test"} if entry.get("split_arg") else {"train": train}
    try:
        base = cls(str(root), download=False, **split)
    except (RuntimeError, FileNotFoundError, OSError):  # torchvision's text suggests download=True: not ours
        raise RcompError(f"dataset {entry.name} not found or incomplete under {root}: "
                         f"{entry.get('missing', '').format(root=root)}; or point --data-dir "
                         "(or RCOMP_DATA) at the folder that holds them") from None
    except ImportError as exc:  # svhn needs scipy
        raise RcompError(f"dataset {entry.name} needs an extra package: {exc}") from None
    classes = entry.get("classes")
    return AdaptedDataset(base, spec, entry.get("num_classes"), tuple(classes) if classes else None)


def load_sklearn_digits(entry, train: bool, spec, root: Path, **_) -> TensorImages:
    return digits(train, spec)


def load_fake(entry, train: bool, spec, root: Path, *, seed: int = 0, fake_size: int | None = None, **_):
    n_train, n_test = entry.get("sizes")
    n = fake_size if fake_size is not None else (n_train if train else n_test)
    return FakeImages(n, spec, entry.get("num_classes"), seed=seed + (0 if train else 1))


def load_folder(entry, train: bool, spec, root: Path, *, log=None, **_):
    return image_folder(root, "train" if train else "test", spec, log)


class ImageFiles(Dataset):
    """Image files with labels, each read safely (:func:`rcomp.data.images.read_image`) and adapted to the spec."""

    def __init__(self, samples: list, spec, classes: tuple[str, ...]):
        self.samples, self.spec, self.classes, self.num_classes = samples, spec, classes, len(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from rcomp.data.images import read_image

        path, label = self.samples[i]
        img = read_image(path)
        return adapt_images(img.float() / 255.0, self.spec), int(label)


def image_folder(root: Path, split: str, spec, log=None):
    """Class sub-folders under ``root/split`` when ``root`` has ``train/`` and ``test/``; otherwise under
    ``root`` itself, with a fixed seeded held-out test split (said through ``log``)."""
    from rcomp.data import images

    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    folder = root / split if has_split else root / "train" if (root / "train").is_dir() else root
    samples, classes = images.scan(folder)
    if not has_split:
        total = len(samples)
        samples = images.split_samples(samples, split)
        if log is not None:
            log(f"image folder {folder} has no train/ and test/ pair: using a held-out "
                f"{images.TEST_FRACTION:.0%} of each class (seed {images.SPLIT_SEED}) as the test split; "
                f"{split}: {len(samples)} of {total} images")
    if not samples:
        raise RcompError(f"image folder {root} has too few images for a {split} split; add images or make "
                         "DIR/train and DIR/test")
    return ImageFiles(samples, spec, classes)
