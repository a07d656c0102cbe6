"""The stage commands: each parses its options into the stage's config, runs the stage and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from rcomp.cli.build import help_text, make_command
from rcomp.cli.output import emit_json, emit_path, log, print_attack_report, print_training
from rcomp.stages import STAGES, get_stage

#: how each stage takes its positional inputs (see rcomp.cli.build.INPUT_HELP)
INPUTS = {"convert": "source", "prune": "one", "quantize": "one", "finetune": "optional", "attack": "one",
          "bench": "many", "export": "one"}


def _print_checkpoint(name: str, cfg: Any, res) -> None:
    if res.output is None:  # a torchrun rank other than 0
        return
    if name == "finetune":
        print_training(res.report)
    if cfg.json:
        emit_json(res.report)
    else:
        emit_path(res.output)


def _print_attack(cfg: Any, res) -> None:
    if getattr(res, "silent", False):  # a torchrun rank other than 0
        return
    if cfg.json:
        emit_json(res.report)
    else:
        print_attack_report(res.report)


def _print_bench(cfg: Any, res) -> None:
    if getattr(res, "silent", False):  # a torchrun rank other than 0
        return
    print(res.text, flush=True)
    res.raise_failures()


def _handler(name: str):
    stage = get_stage(name)

    def handle(cfg: Any, inputs: list[Path]) -> None:
        res = stage.run(cfg, inputs, log=log)
        if name == "attack":
            _print_attack(cfg, res)
        elif name == "bench":
            _print_bench(cfg, res)
        else:
            _print_checkpoint(name, cfg, res)

    return handle


def register(app: typer.Typer) -> None:
    for name in STAGES:
        stage = get_stage(name)
        mod = stage.module
        make_command(app, name, stage.config, INPUTS[name], _handler(name),
                     help_text(mod.SUMMARY, mod.DOC, mod.EXAMPLES))
