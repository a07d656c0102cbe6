"""Per-example records of an evaluation kept on disk (``--records DIR``), so that an interrupted
evaluation continues where it stopped (``--resume``) and ends bit-identical to an uninterrupted one.

``DIR/manifest.json`` holds what the records belong to: the model's sha256, the data, split and
number of points, the batch size, every attack's parameters, the seed and the mode; its sha256
is the records' digest. Each batch of the loop becomes one chunk, ``DIR/chunk-NNNNNN.safetensors``
(plain tensors, no pickle), written atomically once the batch is done, carrying the digest and
its point indices in its metadata: per point the label, clean-correct, the stage that fooled it
and the kept perturbation's norm; per point and attack whether it ran, whether the point stayed
correct and the perturbation's norm; per attack its seconds and its call counter (what its
random streams derive from). A ``kill -9`` loses at most the batch in flight. On ``--resume`` the
loop reads the chunks back, folds them into the figures exactly as it folded them when they were
made, sets each attack's call counter to where it stood, and runs the remaining batches.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError

KIND = "rcomp-eval-records"
VERSION = 2  # 2: ``index`` is the point's dataset index (1: its position among the evaluated points)
_CHUNK = re.compile(r"^chunk-(\d{6})\.safetensors$")


def digest_of(info: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()


class RecordDir:
    """A folder of records for one evaluation, described by ``info`` (JSON-able)."""

    def __init__(self, path: Path, info: dict[str, Any], resume: bool = False):
        from rcomp.io.atomic import TMP_SUFFIX

        self.path = Path(path)
        self.info = {"kind": KIND, "version": VERSION, **info}
        self.digest = digest_of(self.info)
        if self.path.exists() and not self.path.is_dir():
            raise RcompError(f"--records {self.path} is a file; give a folder")
        man = self.path / "manifest.json"
        if man.exists():
            try:
                old = json.loads(man.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                raise RcompError(f"--records {self.path}: manifest.json is unreadable; give a new folder") from None
            if not isinstance(old, dict) or old.get("digest") != self.digest:
                raise RcompError(f"--records {self.path} holds records of another evaluation "
                                 f"({self._what_differs(old)}); give a new folder, or the options of that run")
            if not resume and self.chunks():
                raise RcompError(f"--records {self.path} already holds records of this evaluation; add --resume to "
                                 "continue it, or give a new folder")
        elif self.path.exists() and any(self.path.iterdir()):
            raise RcompError(f"--records {self.path} is a folder of other files; give a new or empty folder")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            from rcomp.io.atomic import atomic_write_text

            atomic_write_text(man, json.dumps({"digest": self.digest, **self.info}, indent=1, sort_keys=True,
                                              default=str) + "\n", exclusive=True)
        for stale in self.path.glob(f".chunk-*{TMP_SUFFIX}"):  # a chunk a killed run had not finished
            stale.unlink(missing_ok=True)

    def _what_differs(self, old: Any) -> str:
        if not isinstance(old, dict):
            return "unreadable manifest"
        keys = sorted(k for k in set(self.info) | set(old) - {"digest"}
                      if json.dumps(old.get(k), sort_keys=True, default=str)
                      != json.dumps(self.info.get(k), sort_keys=True, default=str))
        return "differs in " + ", ".join(keys) if keys else "another digest"

    def chunks(self) -> list[Path]:
        """The chunk files written so far (batches done; with sharding, not necessarily contiguous)."""
        return sorted(p for p in self.path.iterdir() if _CHUNK.match(p.name))

    def batches(self) -> set[int]:
        """The batch numbers of the chunks written so far."""
        return {int(m.group(1)) for m in (_CHUNK.match(p.name) for p in self.path.iterdir()) if m}

    def load(self) -> dict[int, dict[str, Any]]:
        """``{batch number: tensors}`` of the chunks written so far, each checked to belong to this evaluation."""
        from rcomp.io.header import read_header
        from rcomp.io.serialize import load_tensors

        out = {}
        for p in self.chunks():
            meta = read_header(p).metadata
            if meta.get("rcomp.kind") != KIND or meta.get("rcomp.digest") != self.digest:
                raise RcompError(f"--records {self.path}: {p.name} belongs to another evaluation; give a new folder")
            t = load_tensors(p)
            try:
                t["first"] = int(meta.get("rcomp.first", -1))
            except ValueError:
                raise RcompError(f"--records {self.path}: {p.name} has a malformed header; give a new folder") from None
            out[int(_CHUNK.match(p.name).group(1))] = t
        return out

    def write(self, k: int, first: int, tensors: dict[str, Any]) -> None:
        from rcomp.io.atomic import atomic_write_bytes
        from rcomp.io.serialize import serialize

        data = serialize(tensors, {"rcomp.kind": KIND, "rcomp.digest": self.digest, "rcomp.first": str(first),
                                   "rcomp.count": str(len(tensors["index"]))})
        atomic_write_bytes(self.path / f"chunk-{k:06d}.safetensors", data, exclusive=True)
