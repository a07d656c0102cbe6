"""Image folders read safely: class sub-folders of image files, hostile input refused fast.

* The folder is walked without trusting it: a symlink loop, a FIFO, a device or any other
  non-regular file is refused with one line naming it (``os.walk(followlinks=True)``, which
  torchvision's ``ImageFolder`` uses, loops forever on a symlink loop).
* Each image's size is read from its header before it is decoded; one of more than
  :data:`MAX_PIXELS` pixels is refused (a 140 KB PNG of 12000x12000 pixels decodes to 5 GB).
* PIL's warnings (decompression bombs, palettes, EXIF) never reach the user.
* :func:`native_shape` reports the images' own size and channels, so a model trained on the
  folder gets the shape of its data rather than 224x224.
* A folder without ``train/`` and ``test/`` is split by :func:`split_samples`: a fixed, seeded,
  per-class held-out test fraction, the same for every command and run seed.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from rcomp.errors import RcompError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: the most pixels one image may have (50 megapixels, e.g. 8660x5773): beyond it, refuse before decoding
MAX_PIXELS = 50_000_000
#: modes read as one channel
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
#: the held-out fraction and its fixed seed when a folder has no train/ and test/
TEST_FRACTION = 0.2
SPLIT_SEED = 0
#: how many images native_shape inspects (headers only)
SHAPE_SAMPLE = 256


@contextmanager
def _quiet_pil():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _regular(path: Path) -> os.stat_result:
    """``os.stat`` (following links) of a file that must be regular; anything else is one RcompError."""
    try:
        st = os.stat(path)
    except OSError as exc:
        reason = "it is a symlink loop" if exc.errno == 40 else (exc.strerror or type(exc).__name__).lower()
        raise RcompError(f"cannot read {path}: {reason}; remove it from the image folder") from None
    if not stat.S_ISREG(st.st_mode):
        raise RcompError(f"{path} is not a regular file (a FIFO, device or socket); remove it from the image folder")
    return st


def _walk(folder: Path, seen: set) -> list[Path]:
    """Image files under ``folder`` (sorted, recursive, following symlinked folders once each)."""
    try:
        real = folder.resolve(strict=True)
    except (OSError, RuntimeError):
        raise RcompError(f"{folder} is a symlink loop; remove it from the image folder") from None
    if real in seen:
        raise RcompError(f"{folder} leads back to {real}, which is already being read (a symlink loop); "
                         "remove the link") from None
    seen = seen | {real}
    files: list[Path] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_symlink() and not os.path.exists(path):
            _regular(path)  # dangling link or loop: names it
        if entry.is_dir():
            files += _walk(path, seen)
        elif path.suffix.lower() in EXTENSIONS:
            _regular(path)
            files.append(path)
        elif not entry.is_file():
            _regular(path)
    return files


def scan(folder: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """``(samples, classes)``: ``samples`` is ``[(path, class index)]`` over the class sub-folders of ``folder``."""
    if not folder.is_dir():
        raise RcompError(f"image folder {folder} does not exist; pass --data-dir DIR with one sub-folder per class")
    classes = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir()))
    if not classes:
        raise RcompError(f"image folder {folder} has no class sub-folders; put each class's images in DIR/CLASS/")
    samples = [(p, i) for i, c in enumerate(classes) for p in _walk(folder / c, set())]
    if not samples:
        raise RcompError(f"image folder {folder} holds no images ({', '.join(EXTENSIONS)}) in its class sub-folders")
    return samples, classes


def open_image(path: Path):
    """The PIL image at ``path``, header read and size checked, not yet decoded."""
    from PIL import Image

    _regular(path)
    try:
        with _quiet_pil():
            img = Image.open(path)
    except Image.DecompressionBombError:
        raise RcompError(f"{path} has more than {MAX_PIXELS:,} pixels (a decompression bomb?); "
                         "resize it or remove it") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RcompError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                         "remove or replace the file") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise RcompError(f"{path} is {w}x{h} pixels, more than {MAX_PIXELS:,} (a decompression bomb?); "
                         "resize it or remove it")
    return img


def read_image(path: Path):
    """``path`` decoded to a (C, H, W) uint8 tensor, C = 1 for grey modes else 3."""
    from torchvision.transforms.functional import pil_to_tensor

    img = open_image(path)
    try:
        with _quiet_pil():
            img.load()
            if img.mode not in ("L", "RGB"):
                img = img.convert("L" if img.mode in GREY_MODES else "RGB")
            return pil_to_tensor(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise RcompError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                         "remove or replace the file") from None
    finally:
        img.close()


def split_samples(samples: list, split: str, fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> list:
    """A seeded per-class held-out split: ``fraction`` of each class (at least one image when the class
    has two or more) goes to ``test``, the rest to ``train``. Fixed by ``seed``, not by the run's seed,
    so training and evaluation commands agree on which images are held out."""
    import random

    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    out = []
    for label in sorted(by_class):
        items = list(by_class[label])
        random.Random(seed * 1_000_003 + label).shuffle(items)
        n_test = max(1, round(fraction * len(items))) if len(items) > 1 else 0
        chosen = items[:n_test] if split == "test" else items[n_test:]
        out += sorted(chosen)
    return out


def native_shape(folder: Path) -> tuple[tuple[int, int, int], str]:
    """The images' own ``(channels, height, width)`` and a note saying how it was chosen.

    Reads headers only (of up to :data:`SHAPE_SAMPLE` images spread over the folder): one channel
    if every image is grey, else three; the most common size."""
    train = folder / "train"
    samples, _ = scan(train if train.is_dir() else folder)
    step = max(1, len(samples) // SHAPE_SAMPLE)
    sizes: Counter = Counter()
    grey = True
    for path, _ in samples[::step][:SHAPE_SAMPLE]:
        img = open_image(path)
        sizes[(img.size[1], img.size[0])] += 1
        grey = grey and img.mode in GREY_MODES
        img.close()
    (h, w), count = sizes.most_common(1)[0]
    c = 1 if grey else 3
    total = sum(sizes.values())
    note = (f"input shape {c}x{h}x{w}: the images' own size and channels"
            + ("" if count == total else f" (the most common size: {count} of {total} images inspected; "
                                         "the others are resized)"))
    return (c, h, w), note
