"""The bench stage: checkpoints side by side (cost, clean, robust and worst-case accuracy), rendered as a
table, markdown, JSON or CSV, with ``--fail-under`` thresholds for CI."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcomp import options as O
from rcomp.errors import RcompError
from rcomp.stages import common as C
from rcomp.stages.attack import AttackOptions
from rcomp.text import printable

FORMATS = ("table", "markdown", "json", "csv")
#: the format ``-o`` writes when --format is not given, by the output's suffix
SUFFIX_FORMATS = {".json": "json", ".csv": "csv", ".md": "markdown"}

SUMMARY = "Compare checkpoints side by side: cost, clean accuracy, robust accuracy per attack, worst case."
DOC = """Parameters, MACs, file size, latency, clean accuracy, robust accuracy per attack and eps, and
the worst case over all attacks (a point counts only if it is correct clean and under every
attack). Every model is evaluated on the same points with the same random starts. Results on
stdout, progress on stderr.

--attack and its options are those of `rcomp attack`; without --attack only clean accuracy and
cost are measured. --fail-under makes it a CI gate: exit code 1, naming each model and metric
that fell short. In JSON, robust_acc is keyed by the attack name as given when one eps is
given, by name@eps when several are."""
EXAMPLES = """rcomp bench base.safetensors pruned.safetensors int8.safetensors --data digits --attack fgsm,pgd --eps 0.1
rcomp bench *.safetensors --data cifar10 -n 1000 --attack auto --eps 8/255 --format markdown
rcomp bench model.safetensors --data digits --attack pgd --eps 0.1 --format json \\
  --fail-under clean=0.9,pgd=0.4,worst=0.35"""


@dataclass
class Config(AttackOptions):
    data: str | None = O.data_opt(help=C.RECORDED_DATA_HELP)
    split: str = O.opt("test", "--split", kind="choice", choices=("train", "test"), help="train or test.")
    n: int | None = O.n_opt()
    format: str | None = O.opt(None, "--format", kind="choice", choices=FORMATS,
                               help="table, markdown, json or csv (default: from the suffix of -o, .json/.csv/.md, "
                                    "else table).")
    json: bool = O.opt(False, "--json", kind="bool", help="Print results as JSON on stdout (--format json).")
    output: Path | None = O.opt(None, "-o", "--output", kind="path", help="Also write the results to this file.")
    fail_under: str | None = O.opt(None, "--fail-under",
                                 help="Exit 1 if any model falls below, e.g. clean=0.9,pgd=0.4,worst=0.35 (metrics: "
                                      "clean, worst, and each attack as named in the results).")
    latency_batch: int = O.opt(64, "--latency-batch", kind="int", min=0, max=65536,
                             help="The larger batch for latency (besides batch 1); 0 measures batch 1 only.")
    batch_size: int = O.batch_opt(128)
    seed: int = O.seed_opt()
    device: str = O.device_opt("auto")
    data_dir: Path | None = O.data_dir_opt()
    arch: str | None = C.arch_opt()
    trust_factory: bool = O.opt(False, "--trust-factory", kind="bool", file_ok=False,
                              file_note="it lets a checkpoint run code, so only the person running rcomp may allow it",
                              help="Import the user factories checkpoints name (only for files you trust).")
    force: bool = O.force_opt()
    compile: bool = O.opt(False, "--compile", kind="bool",
                          help="Time pt2e int8 models (rcomp quantize's default runtime) under torch.compile "
                               "(inductor): faster, but each batch size compiles once (seconds, untimed); other "
                               "models are refused.")

    def check(self) -> None:
        if self.json:
            if self.format not in (None, "table", "json"):
                raise RcompError(f"--json and --format {self.format} disagree; give one of them")
            self.format = "json"
        if self.format is None:
            self.format = SUFFIX_FORMATS.get(Path(self.output).suffix.lower(), "table") if self.output else "table"
            self.format_from_suffix = self.format != "table"
        C.check_data(self.data, self.data_dir)
        if not self.attack and self.eps:
            raise RcompError("--eps needs --attack (e.g. --attack pgd)")
        self.check_attacks()
        from rcomp.parsing import parse_thresholds

        self.thresholds = parse_thresholds(self.fail_under)  # typed once, here; metric names checked in run


# ----- rendering -------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _quant(q: dict | None) -> str:
    """'-' for float models, else e.g. 'int8 x86' or 'sim4'."""
    from rcomp.quant.catalog import label

    return label(q)


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
        row = [printable(m["name"]), printable(m["arch"]), _quant(m.get("quantization")), C.human(m["params"]), C.human(m["macs"]),
               C.human(m["size_bytes"], "B"), *[f"{m['latency_ms'][b]:.2f}" for b in batches], _pct(m["clean_acc"]),
               *[_pct(m["robust_acc"][k]) for k in keys]]
        if keys:
            row.append(_pct(m["worst_case_acc"]))
        row.append(m["gradient_source"])
        rows.append(row)
    return headers, rows


def _csv(result: dict[str, Any]) -> str:
    keys = list(result["attacks"])
    batches = list(result["models"][0]["latency_ms"]) if result["models"] else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "sha256", "arch", "params", "macs", "size_bytes", *[f"latency_ms_b{b}" for b in batches],
                "clean_acc", *[f"robust_acc[{k}]" for k in keys], "worst_case_acc", "gradient_source", "data", "n",
                "device", "threads"])
    for m in result["models"]:
        w.writerow([m["path"], m["sha256"], m["arch"], m["params"], m["macs"], m["size_bytes"],
                    *[m["latency_ms"][b] for b in batches], m["clean_acc"], *[m["robust_acc"][k] for k in keys],
                    m["worst_case_acc"], m["gradient_source"], result["data"], result["n"], result["device"],
                    result["threads"]])
    return buf.getvalue().rstrip("\n")


def render(result: dict[str, Any], fmt: str) -> str:
    """The benchmark in ``fmt``: table, markdown (GitHub), json or csv."""
    if fmt == "json":
        return json.dumps(result, indent=2, default=str)
    if fmt == "csv":
        return _csv(result)
    from tabulate import tabulate

    headers, rows = table_rows(result)
    body = tabulate(rows, headers=headers, tablefmt="github" if fmt == "markdown" else "simple",
                    disable_numparse=True)
    attacks = "; ".join(
        f"{k}: " + ", ".join(f"{p}={v:.4g}" if isinstance(v, float) else f"{p}={v}" for p, v in a.items()
                             if p != "attack")
        for k, a in result["attacks"].items())
    from rcomp.data.subset import points_text

    pts = f" ({points_text(result['points'])})" if result.get("points") else ""
    foot = (f"data {result['data']} {result['split']}, n={result['n']}{pts}, device {result['device']}, "
            f"{result['threads']} threads (wait policy {result.get('thread_policy', '-')}); latency = median ms per batch (ms@B) of 10 repeats after 3 warm-up "
            "under inference_mode (the JSON has the spread)")
    if attacks:
        foot += f"\nattacks: {attacks}\nworst = correct clean and under every attack"
    unsteady = [f"{m['name']} at batch {b} (max/min {st['max_over_min']:.2f})" for m in result["models"]
                for b, st in (m.get("latency") or {}).items() if not st.get("steady", True)]
    if unsteady:
        foot += "\nlatency UNSTEADY, do not trust: " + "; ".join(unsteady) + " (a busy machine? rerun when quiet)"
    if any(m.get("gradient_masking_suspected") for m in result["models"]):
        foot += "\nwarning: gradient masking suspected: " + "; ".join(
            f"{m['name']}: {m['gradient_masking_suspected']} point(s) fooled only by a gradient-free attack"
            for m in result["models"] if m.get("gradient_masking_suspected"))
    return f"{body}\n\n{foot}"


def _label(item: Any) -> tuple[str, ...]:
    """A path's parts; for a model in memory, its file's parts if it is still that file, else
    ``(arch last-command,)``."""
    if isinstance(item, (str, Path)):
        return Path(item).resolve().parts
    if getattr(item, "source_path", None) is not None:
        return Path(item.source_path).resolve().parts
    meta = getattr(item, "meta", None)
    arch = getattr(getattr(meta, "arch", None), "name", None) or "model"
    hist = getattr(meta, "history", None) or []
    last = hist[-1].get("command") if hist and isinstance(hist[-1], dict) else None
    return (f"{arch} {last}" if last else arch,)


def unique_names(items: list) -> list[str]:
    """A distinct name per model: the shortest path suffix that tells each file apart (``a/base.safetensors``,
    ``b/base.safetensors``); for a model made in memory its architecture and last command (``convnet8
    prune``); still equal names get their position in the list (``convnet8 prune[2]``)."""
    parts = [_label(p) for p in items]
    names = []
    for i, p in enumerate(parts):
        k = 1
        while k < len(p) and any(j != i and q[-k:] == p[-k:] for j, q in enumerate(parts)):
            k += 1
        names.append(str(Path(*p[-k:])) if len(p) > 1 else p[0])
    return [f"{n}[{i}]" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _data(cfg: Config, paths: list, names: list[str], log) -> str:
    """--data, else the dataset every model records (one rule: :func:`rcomp.stages.common.resolve_data`)."""
    if cfg.data:
        return cfg.data
    if not paths:
        raise RcompError("give at least one checkpoint to benchmark")
    recorded = [C.recorded_dataset(p) for p in paths]
    if len(set(recorded)) > 1:
        which = ", ".join(f"{n}: {r or 'none'}" for n, r in zip(names, recorded, strict=True))
        raise RcompError(f"the models record different datasets ({which}); give --data NAME to compare them on one")
    source = names[0] if len(paths) == 1 else f"every model ({len(paths)})"
    return C.resolve_data(None, recorded[0], source, cfg.data_dir, log)


def _load_onnx(paths: list, attacks: dict, cfg: Config, log) -> list:
    """ONNX files loaded up front (with their gradient surrogates), so gradient attacks without one are
    refused before any model is evaluated; checkpoints stay paths."""
    from rcomp.onnx.runtime import is_onnx_path

    out = []
    for p in paths:
        if is_onnx_path(p):
            model = C.load_model(Path(p), C.resolve_device(cfg.device), surrogate=cfg.surrogate)
            C.check_gradients(model, expand(attacks), Path(p).name, log)
            p = model
        out.append(p)
    if cfg.surrogate is not None and not any(is_onnx_path(p) for p in paths):
        raise RcompError("--surrogate is for .onnx models (they have no gradients); none was given, so drop it")
    return out


def _check_compilable_up_front(paths: list, names: list[str]) -> None:
    """``--compile`` refuses every model it cannot time before the first one is evaluated (a float file
    listed third was refused after the first had been evaluated and compiled): from the headers."""
    from rcomp.evaluation.bench import check_compilable, check_compilable_record
    from rcomp.io.format import CheckpointMeta
    from rcomp.io.header import read_header
    from rcomp.onnx.runtime import is_onnx_path

    for p, name in zip(paths, names, strict=True):
        if is_onnx_path(p):
            check_compilable_record(None, name)
        elif isinstance(p, Path):
            check_compilable_record(CheckpointMeta.from_metadata(read_header(p).metadata, where=str(p)).compression,
                                    name)
        else:
            check_compilable(p, name)


def expand(attacks: dict) -> dict:
    from rcomp.evaluation.cascade import expand_suites

    return expand_suites(attacks)


def records_sha(model, path) -> str:
    sha = getattr(model, "source_sha256", None)
    if sha is None and path is not None:
        from rcomp.io.header import sha256_file

        sha = sha256_file(path)
    return str(sha or "unknown")


def run(cfg: Config, inputs: list, *, log=C.stderr_log, dist=None, **_: Any) -> C.StageResult:
    """Benchmark the checkpoints (paths or loaded models); writes only the ``-o`` copy of the results.
    Under torchrun (with ``--records DIR``) the processes split each model's batches; rank 0 reports.
    ``dist``: the caller owns the process group (see :func:`rcomp.stages.attack.run`)."""
    from rcomp.evaluation.bench import check_metrics
    from rcomp.io.atomic import check_output_path
    from rcomp.train import distributed as D

    paths = [C.check_input(p, onnx=True) if isinstance(p, (str, Path)) else p for p in inputs]
    names = unique_names(paths)
    if cfg.output is not None and (dist is None or dist.is_main):
        check_output_path(Path(cfg.output), tuple(p for p in paths if isinstance(p, Path)), force=cfg.force)
    C.seed_everything(cfg.seed)
    attacks = cfg.build(cfg.seed) if cfg.attack else {}
    if cfg.compile:
        _check_compilable_up_front(paths, names)
    models = _load_onnx(paths, attacks, cfg, log)
    parsed = getattr(cfg, "thresholds", None)  # set by check(); a config built without it is parsed here
    if parsed is None:
        from rcomp.parsing import parse_thresholds

        parsed = parse_thresholds(cfg.fail_under)
    thresholds = check_metrics(parsed, list(attacks))
    C.require_records(cfg, dist)
    with D.process_group(dist, C.resolve_device(cfg.device)) as (dist, dev):
        data = _data(cfg, models, names, log if dist.is_main else _silent)  # rank 0 alone says the data
        return _run(cfg, paths, models, attacks, thresholds, dist, dev, log, data, names)


def _run(cfg: Config, paths: list, models: list, attacks: dict, thresholds: dict, dist, dev: str, log,
         data: str, names: list[str]) -> C.StageResult:
    from rcomp.evaluation.bench import bench, check_thresholds
    from rcomp.io.atomic import atomic_write_text

    main = dist.is_main
    # latency: rank 0 alone, so that the processes do not slow each other's timings
    batches = () if not main else (1, cfg.latency_batch) if cfg.latency_batch > 1 else (1,)

    rcfg = dataclasses.replace(cfg, data=data)  # the records' digest names the data the models ran on

    def records(model, path, n):  # one sub-folder per model, named by its content
        from rcomp.stages.attack import open_records

        sha = records_sha(model, path)
        return open_records(rcfg, model, path, attacks, dev, n, log if main else _silent,
                            Path(cfg.records) / f"model-{sha[:16]}",
                            dist=dist if dist.enabled else None)

    result = bench(models, data, attacks, split=cfg.split, n=cfg.n, batch_size=cfg.batch_size, device=dev,
                   data_dir=cfg.data_dir, latency_batches=batches, arch=cfg.arch, trust_factory=cfg.trust_factory,
                   progress=main, log=log if main else None, cascade=cfg.cascade,
                   records=records if cfg.records is not None else None,
                   shard=(dist.rank, dist.world) if dist.enabled else None, names=names,
                   compile_latency=cfg.compile)
    if not main:
        out = C.StageResult(report={})
        out.silent = True  # type: ignore[attr-defined]
        return out
    for m, name in zip(result["models"], names, strict=True):
        m["name"] = name
    from rcomp.onnx.runtime import thread_policy

    result["thread_policy"] = thread_policy()
    text = render(result, cfg.format or "table")
    if getattr(cfg, "format_from_suffix", False):
        log(f"--format {cfg.format} (from the suffix of {printable(Path(cfg.output).name)}; --format sets another)")
    if cfg.output is not None:
        atomic_write_text(Path(cfg.output), text + "\n", exclusive=not cfg.force)
        log(f"wrote {cfg.output}")
    return C.StageResult(output=cfg.output, report=result, text=text, failures=check_thresholds(result, thresholds))


def _silent(msg: str) -> None:
    """The log of a torchrun process other than rank 0."""
