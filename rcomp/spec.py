"""The core types every layer shares: what a model eats (:class:`InputSpec`) and how it is built
(:class:`ArchSpec`). Pure Python, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rcomp.errors import RcompError


@dataclass
class InputSpec:
    """What the model eats: C x H x W images in [0, 1]; normalisation happens inside the model."""

    channels: int = 3
    height: int = 32
    width: int = 32
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    range: list[float] = field(default_factory=lambda: [0.0, 1.0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def validate(self, where: str = "input spec") -> InputSpec:
        for name in ("channels", "height", "width"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65536:
                raise RcompError(f"{where}: {name} must be a positive integer, got {v!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise RcompError(
                f"{where}: mean and std need one value per channel ({self.channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        for v in list(self.mean) + list(self.std):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RcompError(f"{where}: mean and std must be finite numbers, got {v!r}")
        if any(s <= 0 for s in self.std):
            raise RcompError(f"{where}: std values must be positive")
        if list(self.range) != [0.0, 1.0]:
            raise RcompError(f"{where}: only the value range [0, 1] is supported, got {self.range}")
        return self

    @classmethod
    def from_dict(cls, d: dict, where: str = "input spec") -> InputSpec:
        if not isinstance(d, dict):
            raise RcompError(f"{where} must be a JSON object")
        try:
            spec = cls(
                channels=d["channels"], height=d["height"], width=d["width"],
                mean=list(d.get("mean", [0.0] * d["channels"])), std=list(d.get("std", [1.0] * d["channels"])),
                range=[float(x) for x in d.get("range", [0.0, 1.0])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RcompError(f"{where} is malformed ({exc})") from None
        return spec.validate(where)


@dataclass
class ArchSpec:
    """Registry name and constructor keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
