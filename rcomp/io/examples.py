"""The file of adversarial examples written by ``rcomp attack -o`` and replayed by ``--from``.

Plain safetensors: ``images``, ``adv_images`` and ``labels``, with the attack's parameters as JSON
metadata; files written since several attacks (a suite, a cascade) can be saved also hold, per
point, ``index`` (its index in the dataset split; in files written before 2026-12-01, its position among
the evaluated points, which differs under ``-n``), ``stage`` (the position, in the metadata's
``stages`` list, of the first attack that fooled it; -1: none) and ``clean_correct``. The
adversarial image of each point is that of its per-example worst case: the first attack that
fooled it. rcomp's own writer sorts keys, so the same examples give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError
from rcomp.io.format import ADV_KIND


def save_examples(out: Path, images, adv, labels, info: dict[str, Any], inputs: tuple, force: bool,
                  extra: dict[str, Any] | None = None) -> None:
    """Write the file; ``extra`` adds per-point tensors (``index``, ``stage``, ``clean_correct``)."""
    from rcomp.io.atomic import atomic_write_bytes, check_output_path
    from rcomp.io.serialize import serialize

    check_output_path(out, inputs, force=force)
    data = serialize({"images": images, "adv_images": adv, "labels": labels, **(extra or {})},
                     {"rcomp.kind": ADV_KIND, "rcomp.adversarial": json.dumps(info, sort_keys=True)})
    atomic_write_bytes(out, data, exclusive=not force)


def load_examples(path: Path):
    """(images, adv_images, labels, info) from a file written by ``rcomp attack -o``."""
    return load_examples_with_points(path)[:4]


def load_examples_with_points(path: Path):
    """(images, adv_images, labels, info, points): ``points`` holds those of the per-point tensors
    ``stage``, ``index`` and ``clean_correct`` the file has (older files have none), as int64."""
    from rcomp.io.header import read_header
    from rcomp.io.serialize import load_tensors

    header = read_header(path)
    if header.metadata.get("rcomp.kind") != ADV_KIND:
        raise RcompError(f"--from {path} is not a file of adversarial examples; make one with rcomp attack ... -o FILE")
    try:
        info = json.loads(header.metadata.get("rcomp.adversarial", "{}"))
    except json.JSONDecodeError:
        raise RcompError(f"--from {path} has malformed metadata rcomp.adversarial") from None
    t = load_tensors(path)
    for k in ("images", "adv_images", "labels"):
        if k not in t:
            raise RcompError(f"--from {path} lacks the tensor {k!r}; re-create it with rcomp attack -o")
    x, xa, y = t["images"], t["adv_images"], t["labels"]
    if x.shape != xa.shape or x.dim() != 4 or y.dim() != 1 or len(y) != len(x):
        raise RcompError(f"--from {path}: images {tuple(x.shape)}, adv_images {tuple(xa.shape)} and labels "
                         f"{tuple(y.shape)} do not match")
    check_example_values(path, x, xa, y)
    points = {}
    for k in ("stage", "index", "clean_correct"):
        if k in t:
            v = t[k]
            if v.dim() != 1 or len(v) != len(y) or v.dtype.is_floating_point or v.dtype.is_complex:
                raise RcompError(f"--from {path}: its {k!r} tensor does not hold one integer per point; "
                                 "re-create the file with rcomp attack -o")
            points[k] = v.long()
    return x, xa, y, info if isinstance(info, dict) else {}, points


def check_example_values(path: Path, x, xa, y) -> None:
    """Labels are whole class indices (an integer tensor, >= 0: NaN or fractional labels are refused);
    images are finite values in [0, 1]."""
    import torch

    if y.is_floating_point() or y.dtype == torch.bool or (len(y) and int(y.min()) < 0):
        raise RcompError(f"--from {path}: labels must be whole class indices >= 0 (an integer tensor), found "
                         f"{str(y.dtype).replace('torch.', '')} values; re-create the file with rcomp attack -o")
    for name, t in (("images", x), ("adv_images", xa)):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or (
                t.numel() and (float(t.min()) < 0 or float(t.max()) > 1)):
            raise RcompError(f"--from {path}: {name} must be finite values in [0, 1]; re-create the file with "
                             "rcomp attack -o")
