"""``rcomp demo``: the study end to end, offline, on digits, with a report."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from rcomp.cli.common import JsonOpt, emit_json, log

QUICK = {"epochs_base": "2", "epochs_ft": "1", "n": "64"}


def demo_recipe_text() -> str:
    return resources.files("rcomp.recipes").joinpath("demo.yaml").read_text()


def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Report folder: every checkpoint, report.md, "
                                                            "report.json, tradeoff.png.")] = Path("rcomp-demo"),
    show_recipe: Annotated[bool, typer.Option("--show-recipe", help="Print the built-in recipe and exit.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny settings (2 + 1 epochs, 64 test images): a smoke "
                                                        "test of the whole chain in about a minute.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe variable or stage option, "
                                                                 "e.g. --set eps=0.2.", show_default=False, metavar="KEY=VALUE")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Skip the trade-off plot.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the study of Thorsteinsson et al. (arXiv 2403.09441) end to end on digits, offline.

    Trains a standard and a PGD-adversarially trained convnet8; prunes the standard model at 0.5,
    quantizes it to int8 and to simulated int4; fine-tunes each compressed model standard and
    adversarially; benches every checkpoint with FGSM and PGD; writes report.md, report.json and
    tradeoff.png, and says whether adversarial fine-tuning of the compressed models reached the
    robustness of the adversarially trained baseline, at what cost. A second run skips finished stages.

    \b
    Examples:
      rcomp demo
      rcomp demo --out-dir /tmp/demo --set eps=0.2
      rcomp demo --show-recipe > my-study.yaml   # edit, then: rcomp run my-study.yaml
    """
    from rcomp.cli.run import parse_sets
    from rcomp.recipes.engine import Recipe, run_recipe
    from rcomp.recipes.report import build_report

    text = demo_recipe_text()
    if show_recipe:
        print(text, end="")
        return
    overrides = {**(QUICK if quick else {}), **parse_sets(set_)}
    recipe = Recipe(text, source="demo recipe", overrides=overrides)
    t0 = time.perf_counter()
    records = run_recipe(recipe, out_dir, log=log)
    import json

    bench = json.loads((Path(out_dir) / "bench.json").read_text())
    report = build_report(bench, records, Path(out_dir), recipe_name="demo", plot=not no_plot)
    total = time.perf_counter() - t0
    log(f"demo finished in {total:.0f} s; report in {out_dir}/report.md")
    if json_out:
        emit_json({k: v for k, v in report.items() if k != "markdown"})
    else:
        print(report["markdown"])
