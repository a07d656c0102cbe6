"""Checkpoint format v1: the metadata schema (see docs/checkpoint-format.md).

Pure Python, no torch: ``rcomp info`` reads checkpoints through this module alone.
Every field lives under a ``rcomp.`` key of the safetensors header metadata, as JSON.
Readers ignore keys they do not know, so later versions can add fields without breaking
older files; a file whose ``rcomp.format`` is newer than :data:`FORMAT_VERSION` is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rcomp.errors import RcompError
from rcomp.spec import ArchSpec, InputSpec
from rcomp.text import printable

FORMAT_VERSION = 1
PREFIX = "rcomp."
#: ``rcomp.kind`` of a file of adversarial examples (``rcomp attack -o``, :mod:`rcomp.io.examples`)
ADV_KIND = "adversarial-examples"
#: The history written to a file is at most this many bytes of JSON (half the header limit of
#: :data:`rcomp.io.header.MAX_HEADER_BYTES`); see :func:`bounded_history`.
HISTORY_MAX_BYTES = 8 * 1024 * 1024
TRIMMED = "history-trimmed"


@dataclass
class CheckpointMeta:
    arch: ArchSpec
    input: InputSpec
    num_classes: int
    class_names: list[str] | None = None
    dataset: str | None = None
    #: ``{"structure": {module: {attr: value}}, "pruning": {...}, "quantization": {...}}``
    compression: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # unknown rcomp.* keys, kept on re-save

    # ----- serialisation -------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        from rcomp import __version__

        meta = {f"{PREFIX}{k}": v for k, v in self.extra.items()}
        meta.update({
            f"{PREFIX}format": str(FORMAT_VERSION),
            f"{PREFIX}version": __version__,
            f"{PREFIX}arch": json.dumps(asdict(self.arch), sort_keys=True),
            f"{PREFIX}input": json.dumps(asdict(self.input), sort_keys=True),
            f"{PREFIX}classes": json.dumps({"num_classes": self.num_classes, "names": self.class_names}),
            f"{PREFIX}dataset": json.dumps(self.dataset),
            f"{PREFIX}compression": json.dumps(self.compression, sort_keys=True),
            f"{PREFIX}history": json.dumps(bounded_history(self.history)),
            f"{PREFIX}stats": json.dumps(self.stats, sort_keys=True),
        })
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str = "checkpoint") -> CheckpointMeta:
        if f"{PREFIX}format" not in meta:
            if meta.get(f"{PREFIX}kind") == ADV_KIND:
                raise RcompError(f"{where} holds adversarial examples written by rcomp attack -o, not a model; "
                                 "replay them with: rcomp attack CKPT --from FILE")
            raise RcompError(
                f"{where} is a safetensors file but not an rcomp checkpoint (no rcomp metadata); "
                "turn it into one with: rcomp convert FILE --arch NAME"
            )
        ver = meta[f"{PREFIX}format"]
        if not (ver.isascii() and ver.isdigit()) or len(ver) > 6:  # str.isdigit alone accepts '²'
            raise RcompError(f"{where} has a malformed format version {printable(repr(ver[:40]), 60)}")
        if int(ver) > FORMAT_VERSION:
            raise RcompError(
                f"{where} uses checkpoint format {ver}, newer than this rcomp reads ({FORMAT_VERSION}); upgrade rcomp"
            )
        if int(ver) < 1:
            raise RcompError(f"{where} has unknown checkpoint format version {ver}")

        def field_json(key: str, required: bool = True, default: Any = None) -> Any:
            raw = meta.get(PREFIX + key)
            if raw is None:
                if required:
                    raise RcompError(f"{where} is missing metadata field {PREFIX + key}; re-create it with rcomp convert")
                return default
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, RecursionError):
                raise RcompError(f"{where} has malformed metadata field {PREFIX + key} (not JSON)") from None

        arch = field_json("arch")
        if (not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not arch["name"]
                or not isinstance(arch.get("kwargs", {}), dict)):
            raise RcompError(f"{where} has malformed metadata field {PREFIX}arch (needs a name and kwargs)")
        spec = InputSpec.from_dict(field_json("input"), where=f"{where}: {PREFIX}input")
        classes = field_json("classes")
        if not isinstance(classes, dict):
            raise RcompError(f"{where} has malformed metadata field {PREFIX}classes")
        nc, names = classes.get("num_classes"), classes.get("names")
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise RcompError(f"{where}: number of classes must be a positive integer, got {printable(repr(nc), 40)}")
        if names is not None and (not isinstance(names, list) or len(names) != nc
                                  or not all(isinstance(n, str) for n in names)):
            raise RcompError(f"{where}: class names must be a list of {nc} strings")
        dataset = field_json("dataset", required=False)
        if dataset is not None and not isinstance(dataset, str):
            raise RcompError(f"{where} has malformed metadata field {PREFIX}dataset")
        compression = _or_default(field_json("compression", required=False), {})
        history = _or_default(field_json("history", required=False), [])
        stats = _or_default(field_json("stats", required=False), {})
        if not isinstance(compression, dict):
            raise RcompError(f"{where} has malformed metadata field {PREFIX}compression")
        bad = next((k for k, v in compression.items() if not isinstance(v, dict)), None)
        if bad is not None:  # each record (quantization, pruning, ...) is an object of fields
            raise RcompError(f"{where}: compression.{printable(str(bad), 40)} must be an object; the file is damaged "
                             "or edited")
        check_history(history, where)
        if not isinstance(stats, dict):
            raise RcompError(f"{where} has malformed metadata field {PREFIX}stats")
        known = {"format", "version", "arch", "input", "classes", "dataset", "compression", "history", "stats"}
        extra = {k[len(PREFIX):]: v for k, v in meta.items() if k.startswith(PREFIX) and k[len(PREFIX):] not in known}
        return cls(
            arch=ArchSpec(arch["name"], dict(arch.get("kwargs", {}))), input=spec, num_classes=nc,
            class_names=names, dataset=dataset, compression=compression, history=history, stats=stats, extra=extra,
        )


def check_history(history: Any, where: str) -> None:
    """A history is a list of objects whose ``command`` is text and ``params`` / ``metrics`` are objects."""
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise RcompError(f"{where} has malformed metadata field {PREFIX}history (a list of objects)")
    for i, h in enumerate(history, 1):
        for key, kind, name in (("command", str, "text"), ("params", dict, "an object"),
                                ("metrics", dict, "an object"), ("results", dict, "an object")):
            if h.get(key) is not None and not isinstance(h[key], kind):
                raise RcompError(f"{where} has a malformed history entry {i}: its {key} is "
                                 f"{type(h[key]).__name__}, not {name}; the metadata is damaged or edited")


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def bounded_history(history: list[dict[str, Any]], max_bytes: int = HISTORY_MAX_BYTES) -> list[dict[str, Any]]:
    """The history as written to a file: whole when its JSON fits ``max_bytes``, else trimmed.

    Trimming keeps the first entry (where the model came from), then one entry
    ``{"command": "history-trimmed", "params": {"dropped": N}}`` counting every entry dropped so far
    (earlier summaries included), then the newest entries that fit. A file's history therefore
    never grows the header past what rcomp reads back.
    """
    sizes = [len(json.dumps(h)) + 2 for h in history]
    if sum(sizes) <= max_bytes:
        return history
    head = history[:1] if sizes and sizes[0] <= max_bytes // 4 and history[0].get("command") != TRIMMED else []
    budget = max_bytes - sum(sizes[: len(head)]) - 512
    tail: list[dict[str, Any]] = []
    for h, n in zip(reversed(history[len(head):]), reversed(sizes[len(head):]), strict=True):
        if n > budget or h.get("command") == TRIMMED:
            break
        tail.insert(0, h)
        budget -= n
    middle = history[len(head): len(history) - len(tail)]
    dropped = sum(_dropped_count(h) for h in middle)
    summary = {"command": TRIMMED, "params": {"dropped": dropped},
               "note": f"{dropped} older history entries were dropped to keep the header under its size limit"}
    return [*head, summary, *tail]


def _dropped_count(entry: dict[str, Any]) -> int:
    """How many entries ``entry`` stands for: 1, or the count inside an earlier trimming summary."""
    if entry.get("command") == TRIMMED:
        n = (entry.get("params") or {}).get("dropped")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return n
    return 1


def history_entry(command: str, params: dict[str, Any], input_sha256: str | None = None,
                  metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """One history record: what made the file, from what, with which figures."""
    from rcomp import __version__

    return {
        "command": command,
        "params": _jsonable(params),
        "rcomp_version": __version__,
        "time": utc_now(),
        "input_sha256": input_sha256,
        "metrics": _jsonable(metrics or {}),
    }


def utc_now() -> str:
    """UTC time as ISO 8601; honours SOURCE_DATE_EPOCH so reruns can give byte-identical files."""
    import datetime

    epoch = check_source_date_epoch()
    if epoch is not None:
        t = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    else:
        t = datetime.datetime.now(datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


#: the last second of year 9999, the largest time an ISO 8601 history entry can hold
MAX_EPOCH = 253402300799


def check_source_date_epoch() -> int | None:
    """``SOURCE_DATE_EPOCH`` as seconds (None when unset or empty); a malformed value is refused.

    The reproducible-builds convention: a non-negative whole number of seconds since 1970, in ASCII
    digits (``str.isdigit`` alone would accept '²'), here at most :data:`MAX_EPOCH`.
    """
    import os

    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if raw == "":
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) > MAX_EPOCH:
        raise RcompError(f"SOURCE_DATE_EPOCH={printable(repr(raw), 40)} is not a whole number of seconds since "
                         f"1970 (0 to {MAX_EPOCH}); fix or unset it")
    return int(text)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)
