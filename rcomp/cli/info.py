"""``rcomp info``: describe a checkpoint from its header (no torch), or list models and datasets."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from rcomp.cli.common import CkptArg, JsonOpt, emit_json, input_checkpoint
from rcomp.errors import RcompError

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def describe(path: Path) -> dict[str, Any]:
    """Everything ``info`` reports, read from the header and a streaming sha256 of the file."""
    from rcomp.io.format import CheckpointMeta
    from rcomp.io.header import read_header, sha256_file

    header = read_header(path)
    meta = CheckpointMeta.from_metadata(header.metadata, where=str(path))
    params = meta.stats.get("params")
    if not isinstance(params, int):
        params = sum(t.numel for n, t in header.tensors.items()
                     if n.startswith("net.") and not n.endswith(_BUFFER_SUFFIXES))
    comp = meta.compression
    structure = comp.get("structure", {})
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "size_bytes": header.size,
        "format_version": int(header.metadata.get("rcomp.format", "0")),
        "arch": meta.arch.name,
        "arch_kwargs": meta.arch.kwargs,
        "input": {"shape": list(meta.input.shape), "range": meta.input.range, "mean": meta.input.mean,
                  "std": meta.input.std},
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "dataset": meta.dataset,
        "params": params,
        "tensors": len(header.tensors),
        "pruned": bool(comp.get("pruning") or structure),
        "pruning": comp.get("pruning"),
        "layers": structure,
        "quantization": comp.get("quantization"),
        "history": meta.history,
    }


def _print_human(d: dict[str, Any]) -> None:
    from tabulate import tabulate

    rows = [
        ("path", d["path"]),
        ("architecture", d["arch"] + (f" {d['arch_kwargs']}" if d["arch_kwargs"] else "")),
        ("input", f"{'x'.join(map(str, d['input']['shape']))} in [0, 1], mean {d['input']['mean']}, "
                  f"std {d['input']['std']}"),
        ("classes", f"{d['num_classes']}" + (f": {', '.join(d['class_names'])}" if d["class_names"] else "")),
        ("dataset", d["dataset"] or "-"),
        ("parameters", f"{d['params']:,}"),
        ("file size", f"{d['size_bytes']:,} bytes"),
        ("sha256", d["sha256"]),
        ("format", f"rcomp checkpoint v{d['format_version']}"),
    ]
    q = d["quantization"]
    if q:
        rows.append(("quantization", ", ".join(f"{k}={v}" for k, v in q.items() if not isinstance(v, (dict, list)))))
    p = d["pruning"]
    if p:
        rows.append(("pruning", ", ".join(f"{k}={v}" for k, v in p.items() if not isinstance(v, (dict, list)))))
    print(tabulate(rows, tablefmt="plain"))
    if d["layers"]:
        print("\nresized layers (shape attributes after pruning):")
        lrows = [(name, ", ".join(f"{k}={v}" for k, v in attrs.items())) for name, attrs in d["layers"].items()]
        print(tabulate(lrows, headers=["module", "shape"], tablefmt="simple"))
    if d["history"]:
        print("\nhistory:")
        hrows = []
        for i, h in enumerate(d["history"], 1):
            params = ", ".join(f"{k}={v}" for k, v in (h.get("params") or {}).items() if v is not None)
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in (h.get("metrics") or {}).items())
            hrows.append((i, h.get("command"), h.get("time"), params[:80], metrics[:80],
                          (h.get("input_sha256") or "-")[:12]))
        print(tabulate(hrows, headers=["#", "command", "time (UTC)", "parameters", "metrics", "input sha256"],
                       tablefmt="simple"))


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def info(
    ckpt: CkptArg = None,
    json_out: JsonOpt = False,
    models: Annotated[bool, typer.Option("--models", help="List the architectures the registry knows.")] = False,
    datasets: Annotated[bool, typer.Option("--datasets", help="List the datasets the registry knows.")] = False,
) -> None:
    """Describe a checkpoint: architecture, input spec, classes, parameters, size, sha256, compression, history.

    Reads only the header (and hashes the file); torch is not imported.

    Examples:

      rcomp info model.safetensors

      rcomp info model.safetensors --json | jq .history

      rcomp info --models
    """
    if models:
        from rcomp.models.builtin import BUILTINS
        from rcomp.models.registry import torchvision_names

        if json_out:
            emit_json({"builtin": sorted(BUILTINS), "torchvision": torchvision_names()})
            return
        for name, (_, desc, shape) in sorted(BUILTINS.items()):
            print(f"{name:16s} {desc} [default input {'x'.join(map(str, shape))}]")
        print("torchvision:     " + ", ".join(torchvision_names()))
        print("user factory:    package.module:factory (imported only when named on the command line)")
        return
    if datasets:
        from rcomp.data.registry import DATASETS

        if json_out:
            emit_json({k: {"num_classes": v.num_classes, "shape": v.shape, "help": v.help} for k, v in DATASETS.items()})
            return
        for name, d in DATASETS.items():
            print(f"{name:14s} {d.help}")
        return
    if ckpt is None and (sys.stdin is None or sys.stdin.isatty()):
        raise RcompError("give a checkpoint to describe (rcomp info CKPT), or --models / --datasets")
    path = input_checkpoint(ckpt)
    d = describe(path)
    if json_out:
        emit_json(d)
    else:
        _print_human(d)
