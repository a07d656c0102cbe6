"""``rcomp demo``: the study end to end, offline, on digits, with a report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import typer

from rcomp.cli.build import help_text, make_command
from rcomp.cli.output import emit_json, log
from rcomp.cli.run import parse_sets
from rcomp.options import json_opt, opt

#: --quick: tiny training and evaluation. The budgets stay the real step counts (so the report's matched
#: costs are the real ones), on batches of 16 instead of 128; auto runs 5 steps and 100 queries.
QUICK = {"epochs_base": "2", "epochs_ft": "1", "n": "64", "n_auto": "16", "*-ft-*.batch-size": "16",
         "bench-auto.steps": "5", "bench-auto.queries": "100"}

SUMMARY = "Run the study of Thorsteinsson et al. (arXiv 2403.09441) end to end on digits, offline."
DOC = """Trains a standard and a PGD-adversarially trained convnet8; prunes and quantizes them; fine-tunes
each compressed model with PGD-7 and with N-FGSM at matched pass budgets (5/20/37.5/50% of the
adversarial baseline's training passes) and a standard control; benches every checkpoint with PGD
and judges the baselines and the largest budgets with auto; writes report.md, report.json and
tradeoff.png, and says whether adversarial fine-tuning of the compressed models reached the
robustness of the adversarially trained baseline, at what cost (total and own accounting). A second run skips
finished stages. --quick is a smoke test of the chain and draws no conclusions."""
EXAMPLES = """rcomp demo
rcomp demo --out-dir /tmp/demo --set eps=0.2
rcomp demo --show-recipe > my-study.yaml   # edit, then: rcomp run my-study.yaml"""


@dataclass
class DemoOptions:
    out_dir: Path = opt(Path("rcomp-demo"), "--out-dir", kind="path",
                        help="Report folder: every checkpoint, report.md, report.json, tradeoff.png.")
    show_recipe: bool = opt(False, "--show-recipe", kind="bool", help="Print the built-in recipe and exit.")
    quick: bool = opt(False, "--quick", kind="bool", help="Tiny settings (2 + 1 epochs, batches of 16, 64 test images): a smoke "
                                                          "test of the whole chain; no conclusions drawn.")
    set: tuple[str, ...] = opt((), "--set", kind="repeat", metavar="KEY=VALUE",
                               help="Override a recipe variable or stage option, e.g. --set eps=0.2.")
    no_plot: bool = opt(False, "--no-plot", kind="bool", help="Skip the trade-off plot.")
    json: bool = json_opt()


def demo_recipe_text() -> str:
    return resources.files("rcomp.recipes").joinpath("demo.yaml").read_text()


def demo(cfg: DemoOptions, inputs: list[Path]) -> None:
    import json

    from rcomp.recipes.engine import Recipe, run_recipe
    from rcomp.recipes.report import build_report

    text = demo_recipe_text()
    if cfg.show_recipe:
        print(text, end="")
        return
    overrides = {**(QUICK if cfg.quick else {}), **parse_sets(cfg.set)}
    recipe = Recipe(text, source="demo recipe", overrides=overrides)
    t0 = time.perf_counter()
    records = run_recipe(recipe, cfg.out_dir, log=log)
    bench = json.loads((Path(cfg.out_dir) / "bench.json").read_text())
    strong = Path(cfg.out_dir) / "bench-auto.json"
    extra = json.loads(strong.read_text()) if strong.exists() else None
    report = build_report(bench, records, Path(cfg.out_dir), recipe_name="demo", plot=not cfg.no_plot,
                          smoke=cfg.quick, extra_bench=extra)
    log(f"demo finished in {time.perf_counter() - t0:.0f} s; report in {cfg.out_dir}/report.md")
    if cfg.json:
        emit_json({k: v for k, v in report.items() if k != "markdown"})
    else:
        print(report["markdown"])


def register(app: typer.Typer) -> None:
    make_command(app, "demo", DemoOptions, None, demo, help_text(SUMMARY, DOC, EXAMPLES), with_config=False)
