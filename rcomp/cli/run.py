"""``rcomp run``: run a YAML recipe of stages, skipping those already up to date."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from rcomp.cli.build import help_text, make_command
from rcomp.cli.output import emit_json, log
from rcomp.errors import RcompError
from rcomp.options import json_opt, opt

SUMMARY = "Run a recipe: stages are rcomp commands with named inputs and outputs, optionally swept over a grid."
DOC = """The whole recipe is checked first (unknown commands or options, values out of range, missing inputs,
cycles, outputs outside the output folder), naming the line. A stage whose output exists and whose
options and inputs are unchanged is skipped, so an interrupted sweep resumes where it stopped. A recipe
cannot run code: a stage naming a user factory (arch: package.module:factory) runs only when the same
factory is given here with --allow-factory. With --workers N (or under torchrun) the stages that do not depend
on each other run side by side in the N processes, and the attack and bench stages are split over them, with
files and figures identical to one process's at the same torch thread count."""
EXAMPLES = """rcomp run examples/paper-fashion-mnist.yaml --set epochs_ft=1 --out-dir runs/fmnist
rcomp run sweep.yaml --workers 2   # independent stages side by side, attack/bench split over 2 processes
torchrun --standalone --nproc-per-node 2 -m rcomp run sweep.yaml   # the same under torchrun
rcomp demo --show-recipe > demo.yaml && rcomp run demo.yaml --dry-run"""


@dataclass
class RunOptions:
    out_dir: Path | None = opt(None, "--out-dir", kind="path",
                               help="Folder for every output (default: the recipe's out_dir, else ./<recipe name>).")
    set: tuple[str, ...] = opt((), "--set", kind="repeat", metavar="KEY=VALUE",
                               help="Override: VAR=VALUE or STAGE.OPTION=VALUE (stage names may use *). Repeatable.")
    dry_run: bool = opt(False, "--dry-run", kind="bool", help="Check the recipe and print the commands; run nothing.")
    allow_factory: tuple[str, ...] = opt((), "--allow-factory", kind="repeat", metavar="PKG.MOD:FN",
                                         help="Let stages build models with this user factory (it runs its code). "
                                              "Repeatable.")
    max_stages: int = opt(1000, "--max-stages", kind="int", min=1, max=10**6,
                          help="Refuse a recipe that expands to more stages than this.")
    workers: int = opt(1, "--workers", kind="int", min=1, max=256,
                       help="Run the recipe in this many local processes: independent stages side by side, attack "
                            "and bench stages split over them (as torchrun would; the files of one process at the same thread "
                            "count). Each uses max(1, cores // N) torch threads unless OMP_NUM_THREADS is set.")
    json: bool = json_opt()


def parse_sets(sets) -> dict[str, str]:
    out = {}
    for s in sets or ():
        if "=" not in s:
            raise RcompError(f"--set {s!r} must be KEY=VALUE (a recipe variable, or STAGE.OPTION)")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def print_records(records: list[dict], dry_run: bool) -> None:
    from tabulate import tabulate

    if dry_run:
        for r in records:
            print(r["command"])
        return
    print(tabulate([(r["stage"], r["status"], f"{r['seconds']:.1f}", r["output"]) for r in records],
                   headers=["stage", "status", "seconds", "output"], tablefmt="simple"))
    from rcomp.stages.bench import render

    for r in records:  # what the bench stages computed, as a table whatever file format they wrote
        if r.get("result"):
            print(f"\n{r['stage']}:\n{render(r['result'], 'table')}")


def worker_flags(json: bool, sets) -> list[str]:
    """The flags every worker of ``--workers N`` gets besides the command's own: the --set overrides, --json,
    and --workers 1 (a worker never starts workers)."""
    return [*(a for s in sets for a in ("--set", s)), *(["--json"] if json else []), "--workers", "1"]


def launch_workers(args: list[str], workers: int) -> None:
    """Run ``rcomp ARGS`` in ``workers`` processes (rcomp.recipes.workers); exit with their code."""
    from rcomp.recipes.workers import launch

    code = launch(args, workers, log)
    if code:
        raise typer.Exit(code)


def run(cfg: RunOptions, inputs: list[Path]) -> None:
    from rcomp.recipes.engine import load_recipe, run_recipe
    from rcomp.recipes.workers import check_workers

    check_workers(cfg.workers)
    rec = load_recipe(inputs[0], parse_sets(cfg.set), max_stages=cfg.max_stages)
    folder = Path(cfg.out_dir or rec.default_out_dir())
    if cfg.workers > 1 and not cfg.dry_run:
        # the whole recipe is checked here first, so a refusal is said once, before any worker starts
        run_recipe(rec, folder, dry_run=True, log=log, allow_factories=frozenset(cfg.allow_factory))
        launch_workers(["run", str(inputs[0]), "--out-dir", str(folder), "--max-stages", str(cfg.max_stages),
                        *(a for f in cfg.allow_factory for a in ("--allow-factory", f)),
                        *worker_flags(cfg.json, cfg.set)], cfg.workers)
        return
    records = run_recipe(rec, folder, dry_run=cfg.dry_run, log=log, allow_factories=frozenset(cfg.allow_factory))
    from rcomp.train.distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 alone prints
        return
    if cfg.json:
        emit_json({"recipe": rec.name, "out_dir": str(folder),
                   "stages": [{k: v for k, v in r.items() if k != "result"} for r in records]})
        return
    print_records(records, cfg.dry_run)


def register(app: typer.Typer) -> None:
    make_command(app, "run", RunOptions, "recipe", run, help_text(SUMMARY, DOC, EXAMPLES), with_config=False)
