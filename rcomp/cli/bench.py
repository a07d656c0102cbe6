"""``rcomp bench``: checkpoints side by side (cost, clean, robust and worst-case accuracy), with
``--fail-under`` thresholds for CI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rcomp.cli.attack import (
    AlphaOpt,
    AttackOpt,
    BatchOpt,
    EpsOpt,
    LossOpt,
    NOpt,
    NormOpt,
    RandomStartOpt,
    RestartsOpt,
    SplitOpt,
    StepsOpt,
    TargetedOpt,
    attack_settings,
)
from rcomp.cli.common import (
    ArchOpt,
    ConfigOpt,
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    OptionalDataOpt,
    SeedOpt,
    input_checkpoint,
    log,
)
from rcomp.errors import RcompError

FORMATS = ("table", "markdown", "json", "csv")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _human(n: int | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n}{unit}"


def _quant(q: dict | None) -> str:
    """'-' for float models, else e.g. 'int8 x86' or 'sim4'."""
    if not q:
        return "-"
    if q.get("mode") == "simulated":
        return f"sim{q.get('bits')}"
    return f"int{q.get('bits')} {q.get('backend', '')}".strip()


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows for the human formats (accuracies in %)."""
    keys = list(result["attacks"])
    batches = list(result["models"][0]["latency_ms"]) if result["models"] else []
    headers = ["model", "arch", "quant", "params", "MACs", "size", *[f"ms@{b}" for b in batches], "clean %",
               *[f"{k} %" for k in keys]]
    if keys:
        headers.append("worst %")
    headers.append("gradient")
    rows = []
    for m in result["models"]:
        row = [m["name"], m["arch"], _quant(m.get("quantization")), _human(m["params"]), _human(m["macs"]), _human(m["size_bytes"], "B"),
               *[f"{m['latency_ms'][b]:.2f}" for b in batches], _pct(m["clean_acc"]),
               *[_pct(m["robust_acc"][k]) for k in keys]]
        if keys:
            row.append(_pct(m["worst_case_acc"]))
        row.append(m["gradient_source"])
        rows.append(row)
    return headers, rows


def render(result: dict[str, Any], fmt: str) -> str:
    """The benchmark in ``fmt``: table, markdown (GitHub), json or csv."""
    if fmt == "json":
        return json.dumps(result, indent=2, default=str)
    if fmt == "csv":
        keys = list(result["attacks"])
        batches = list(result["models"][0]["latency_ms"]) if result["models"] else []
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "sha256", "arch", "params", "macs", "size_bytes",
                    *[f"latency_ms_b{b}" for b in batches], "clean_acc", *[f"robust_acc[{k}]" for k in keys],
                    "worst_case_acc", "gradient_source", "data", "n", "device", "threads"])
        for m in result["models"]:
            w.writerow([m["path"], m["sha256"], m["arch"], m["params"], m["macs"], m["size_bytes"],
                        *[m["latency_ms"][b] for b in batches], m["clean_acc"], *[m["robust_acc"][k] for k in keys],
                        m["worst_case_acc"], m["gradient_source"], result["data"], result["n"], result["device"],
                        result["threads"]])
        return buf.getvalue().rstrip("\n")
    from tabulate import tabulate

    headers, rows = table_rows(result)
    body = tabulate(rows, headers=headers, tablefmt="github" if fmt == "markdown" else "simple",
                    disable_numparse=True)
    attacks = "; ".join(
        f"{k}: " + ", ".join(f"{p}={v:.4g}" if isinstance(v, float) else f"{p}={v}" for p, v in a.items()
                             if p != "attack")
        for k, a in result["attacks"].items())
    foot = (f"data {result['data']} {result['split']}, n={result['n']}, device {result['device']}, "
            f"{result['threads']} threads; latency = median ms per batch (ms@B) under inference_mode")
    if attacks:
        foot += f"\nattacks: {attacks}\nworst = correct clean and under every attack"
    return f"{body}\n\n{foot}"


def bench(
    ckpts: Annotated[list[Path] | None, typer.Argument(
        help="Checkpoints to compare (one row each); read from stdin when omitted and stdin is a pipe.",
        show_default=False)] = None,
    data: OptionalDataOpt = None,
    split: SplitOpt = "test",
    n: NOpt = None,
    attack_name: AttackOpt = None,
    eps: EpsOpt = None,
    norm: NormOpt = "linf",
    steps: StepsOpt = None,
    alpha: AlphaOpt = None,
    random_start: RandomStartOpt = None,
    restarts: RestartsOpt = 1,
    loss: LossOpt = None,
    targeted: TargetedOpt = False,
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, json or csv.")] = "table",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write the results to this file.",
                                                show_default=False)] = None,
    fail_under: Annotated[str | None, typer.Option(
        "--fail-under", help="Exit 1 if any model falls below, e.g. clean=0.9,pgd=0.4,worst=0.35 (metrics: clean, "
                             "worst, and each attack as named in the results).", show_default=False)] = None,
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="The larger batch for latency (besides "
                                                                      "batch 1); 0 measures batch 1 only.")] = 64,
    batch_size: BatchOpt = 128,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    arch: ArchOpt = None,
    trust_factory: Annotated[bool, typer.Option("--trust-factory", help="Import the user factories checkpoints "
                                                                        "name (only for files you trust).")] = False,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Compare checkpoints side by side: parameters, MACs, file size, latency, clean accuracy, robust
    accuracy per attack and eps, and the worst case over all attacks (a point counts only if it is
    correct clean and under every attack). Every model is evaluated on the same points with the
    same random starts. Results on stdout, progress on stderr.

    --attack and its options are those of `rcomp attack`; without --attack only clean accuracy and
    cost are measured. --fail-under makes it a CI gate: exit code 1, naming each model and metric
    that fell short. In JSON, robust_acc is keyed by the attack name as given when one eps is
    given, by name@eps when several are.

    Examples:

    \b
      rcomp bench base.safetensors pruned.safetensors int8.safetensors --data digits --attack fgsm,pgd --eps 0.1
      rcomp bench *.safetensors --data cifar10 -n 1000 --attack pgd --eps 2/255,8/255 --format markdown
      rcomp bench model.safetensors --data digits --attack pgd --eps 0.1 --format json \\
        --fail-under clean=0.9,pgd=0.4,worst=0.35
    """
    from rcomp.cli.common import resolve_device, seed_everything
    from rcomp.evaluation.bench import bench as run_bench
    from rcomp.evaluation.bench import enforce_thresholds, parse_fail_under

    if fmt not in FORMATS:
        raise RcompError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not data:
        raise RcompError("give --data (e.g. --data digits)")
    ckpts = [input_checkpoint(p) for p in ckpts] if ckpts else [input_checkpoint(None)]
    if batch_size < 1:
        raise RcompError(f"--batch-size must be at least 1, got {batch_size}")
    if n is not None and n < 1:
        raise RcompError(f"-n must be at least 1, got {n}")
    if latency_batch < 0:
        raise RcompError(f"--latency-batch must be 0 or more, got {latency_batch}")
    if output is not None:
        from rcomp.io.atomic import check_output_path

        check_output_path(Path(output), tuple(ckpts), force=force)
    seed_everything(seed)
    attacks = {} if attack_name is None else attack_settings(
        attack_name, eps, norm, steps, alpha, random_start, restarts, loss, targeted, seed)
    if attack_name is None and eps:
        raise RcompError("--eps needs --attack (e.g. --attack pgd)")
    thresholds = parse_fail_under(fail_under, list(attacks))
    dev = resolve_device(device)
    batches = (1, latency_batch) if latency_batch > 1 else (1,)
    result = run_bench([Path(p) for p in ckpts], data, attacks, split=split, n=n, batch_size=batch_size,
                       device=dev, data_dir=data_dir, latency_batches=batches, arch=arch,
                       trust_factory=trust_factory, progress=True, log=log)
    text = render(result, fmt)
    print(text, flush=True)
    if output is not None:
        from rcomp.io.atomic import atomic_write_text

        atomic_write_text(Path(output), text + "\n")
        log(f"wrote {output}")
    enforce_thresholds(result, thresholds)
