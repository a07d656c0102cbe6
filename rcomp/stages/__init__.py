"""The stages: one per command that changes or measures a model, in one table.

Each stage module defines a config dataclass (its options, declared once with
:func:`rcomp.options.opt`) and a ``run`` function: load -> operate -> record the history entry ->
save, returning a :class:`~rcomp.stages.common.StageResult`. The CLI, recipes, ``--config`` and the
Python API (``rcomp.prune(...)``) all go through this table. Importing it imports no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

#: stage name -> module under rcomp.stages
STAGES = ("convert", "prune", "quantize", "finetune", "attack", "bench", "export")


@dataclass(frozen=True)
class StageInfo:
    name: str
    config: type
    module: ModuleType

    def run(self, cfg: Any, inputs: list, **kw: Any):
        return self.module.run(cfg, inputs, **kw)


def get_stage(name: str) -> StageInfo:
    from rcomp.errors import RcompError

    if name not in STAGES:
        raise RcompError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    mod = importlib.import_module(f"rcomp.stages.{name}")
    return StageInfo(name, mod.Config, mod)


def stage_table() -> dict[str, StageInfo]:
    return {name: get_stage(name) for name in STAGES}
