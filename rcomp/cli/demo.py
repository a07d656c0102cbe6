"""``rcomp demo``: the study end to end, offline, on digits, with a report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import typer

from rcomp.cli.build import help_text, make_command
from rcomp.cli.output import emit_json, log
from rcomp.cli.run import launch_workers, parse_sets, worker_flags
from rcomp.options import json_opt, opt

#: --quick: tiny training and evaluation. The budgets stay the real step counts (so the report's matched
#: costs are the real ones), on batches of 16 instead of 128; auto runs 5 steps, 100 queries and 1 restart
#: (not 3 on the quantized models). The shipped-file stages export with the legacy exporter there (seconds
#: instead of tens) and query 100 times; the single restart pays for them.
QUICK = {"epochs_base": "2", "epochs_ft": "1", "n": "64", "bench-auto.n": "16", "*-ft-*.batch-size": "16",
         "bench-auto.steps": "5", "bench-auto.queries": "100", "bench-auto.restarts": "1", "exporter": "legacy",
         "ship_queries": "100"}
#: what the shipped-file stages need: the ONNX extra
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")

SUMMARY = "Run the study of Thorsteinsson et al. (arXiv 2403.09441) end to end on digits, offline."
DOC = """Trains a standard and a PGD-adversarially trained convnet8; prunes and quantizes them; fine-tunes
each compressed model with PGD-7 and with N-FGSM at matched pass budgets (5/20/37.5% of the
adversarial baseline's training passes, 50% total with the standard model's training; 5/20/37.5/50% from
the adversarial model; one run per path and method writes every budget on the way, finetune --save-at)
and a standard control; benches every checkpoint with PGD on 180 test images and judges with auto the
baselines and the better method of each path (by PGD); exports the study's path to ONNX, makes it int8
with ONNX Runtime and benches the .onnx files beside their checkpoint (skipped, and said,
without the ONNX extra: pip install 'rcomp[onnx]'); writes report.md, report.json and
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
    workers: int | None = opt(None, "--workers", kind="int", min=1, max=256,
                              help="Local processes running the recipe (independent stages side by side, bench "
                                   "split; the files of one process at the same thread count). Default: min(2, cores), "
                                   "said on stderr.")
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
    from rcomp.recipes.workers import check_workers, cores
    from rcomp.train.distributed import is_main_process, launched

    workers = cfg.workers
    if workers is None:
        workers = 1 if launched() else min(2, cores())
        if not launched():
            log(f"note: --workers not given: running {workers} worker process(es), min(2, {cores()} cores); "
                "--workers 1 runs the demo in this process")
    check_workers(workers)
    overrides = {**(QUICK if cfg.quick else {}), **parse_sets(cfg.set)}
    recipe = Recipe(text, source="demo recipe", overrides=overrides)
    main = is_main_process()
    skip_onnx_stages(recipe, log if main and workers == 1 else _quiet)
    if workers > 1:  # the workers run this same command (checked here first); rank 0 writes the report
        run_recipe(recipe, cfg.out_dir, dry_run=True, log=log)
        launch_workers(["demo", "--out-dir", str(cfg.out_dir), *(["--quick"] if cfg.quick else []),
                        *(["--no-plot"] if cfg.no_plot else []), *worker_flags(cfg.json, cfg.set)], workers)
        return
    t0 = time.perf_counter()
    records = run_recipe(recipe, cfg.out_dir, log=log)
    if not main:  # under torchrun or --workers, rank 0 alone reports
        return
    bench = json.loads((Path(cfg.out_dir) / "bench.json").read_text())
    ran = {r["stage"] for r in records}
    strong, ship = Path(cfg.out_dir) / "bench-auto.json", Path(cfg.out_dir) / "bench-ship.json"
    extra = json.loads(strong.read_text()) if strong.exists() else None
    shipped = json.loads(ship.read_text()) if "bench-ship" in ran and ship.exists() else None
    report = build_report(bench, records, Path(cfg.out_dir), recipe_name="demo", plot=not cfg.no_plot,
                          smoke=cfg.quick, extra_bench=extra, ship_bench=shipped)
    log(f"demo finished in {time.perf_counter() - t0:.0f} s; report in {cfg.out_dir}/report.md")
    if cfg.json:
        emit_json({k: v for k, v in report.items() if k != "markdown"})
    else:
        print(report["markdown"])


def _quiet(msg: str) -> None:
    """The log of a process that does not speak (a worker other than rank 0; the launcher, whose rank 0 says it)."""


def skip_onnx_stages(recipe, log) -> list[str]:
    """Without the ONNX extra, drop the stages that need it (export, ``quantize --backend onnxruntime`` and
    whatever reads their files) and say so on stderr, naming the extra; returns the stages dropped."""
    from rcomp.errors import RcompError
    from rcomp.onnx.deps import installed, require
    from rcomp.recipes.engine import writes_onnx

    needs = [st.name for st in recipe.stages if writes_onnx(st.command, st.options)]
    if not needs or installed(ONNX_MODULES):  # looked up, not imported: the stages import them when they run
        return []
    try:
        require("the demo's shipped-file stages", ONNX_MODULES)
    except RcompError as exc:
        gone = recipe.without(needs)
        log(f"note: {exc}; skipping stages {', '.join(gone)} (the rest of the demo runs)")
        return gone
    return []


def register(app: typer.Typer) -> None:
    make_command(app, "demo", DemoOptions, None, demo, help_text(SUMMARY, DOC, EXAMPLES), with_config=False)
