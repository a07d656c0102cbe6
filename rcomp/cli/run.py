"""``rcomp run``: run a YAML recipe of stages, skipping those already up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcomp.cli.common import JsonOpt, emit_json, log
from rcomp.errors import RcompError


def parse_sets(sets: list[str] | None) -> dict[str, str]:
    out = {}
    for s in sets or []:
        if "=" not in s:
            raise RcompError(f"--set {s!r} must be KEY=VALUE (a recipe variable, or STAGE.OPTION)")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (.yaml).")],
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Folder for every output (default: the "
                                                                   "recipe's out_dir, else ./<recipe name>).",
                                                 show_default=False)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: VAR=VALUE or STAGE.OPTION=VALUE "
                                                                 "(stage names may use *). Repeatable.",
                                                   show_default=False, metavar="KEY=VALUE")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the recipe and print the commands; run "
                                                            "nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run a recipe: stages are rcomp commands with named inputs and outputs, optionally swept over a grid.

    The whole recipe is checked first (unknown commands or options, missing inputs, cycles), naming the
    line. A stage whose output exists and whose command, options and inputs are unchanged is skipped, so
    an interrupted sweep resumes where it stopped.

    \b
    Example:
      rcomp run examples/paper-fashion-mnist.yaml --set epochs_ft=1 --out-dir runs/fmnist
      rcomp demo --show-recipe > demo.yaml && rcomp run demo.yaml --dry-run
    """
    from rcomp.recipes.engine import load_recipe, run_recipe

    rec = load_recipe(recipe, parse_sets(set_))
    folder = Path(out_dir or rec.out_dir or rec.name)
    records = run_recipe(rec, folder, dry_run=dry_run, log=log)
    if json_out:
        emit_json({"recipe": rec.name, "out_dir": str(folder), "stages": records})
        return
    if dry_run:
        for r in records:
            print("rcomp " + " ".join(r["args"]))
        return
    from tabulate import tabulate

    print(tabulate([(r["stage"], r["status"], f"{r['seconds']:.1f}", r["output"]) for r in records],
                   headers=["stage", "status", "seconds", "output"], tablefmt="simple"))
