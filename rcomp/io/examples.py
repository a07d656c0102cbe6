"""The file of adversarial examples written by ``rcomp attack -o`` and replayed by ``--from``.

Plain safetensors: ``images``, ``adv_images`` and ``labels``, with the attack's parameters as JSON
metadata. rcomp's own writer sorts keys, so the same examples give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError

ADV_KIND = "adversarial-examples"


def save_examples(out: Path, images, adv, labels, info: dict[str, Any], inputs: tuple, force: bool) -> None:
    from rcomp.io.atomic import atomic_write_bytes, check_output_path
    from rcomp.io.serialize import serialize

    check_output_path(out, inputs, force=force)
    data = serialize({"images": images, "adv_images": adv, "labels": labels},
                     {"rcomp.kind": ADV_KIND, "rcomp.adversarial": json.dumps(info, sort_keys=True)})
    atomic_write_bytes(out, data, exclusive=not force)


def load_examples(path: Path):
    """(images, adv_images, labels, info) from a file written by ``rcomp attack -o``."""
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
    return x, xa, y, info if isinstance(info, dict) else {}
