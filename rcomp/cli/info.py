"""``rcomp info``: describe a checkpoint from its header (no torch), or list models and datasets."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from rcomp.cli.build import checkpoint_path, help_text, make_command
from rcomp.cli.output import emit_json
from rcomp.errors import RcompError
from rcomp.options import json_opt, opt
from rcomp.text import printable

SUMMARY = "Describe a checkpoint: architecture, input spec, classes, parameters, size, sha256, compression, history."
DOC = "Reads only the header (and hashes the file); torch is not imported."
EXAMPLES = """rcomp info model.safetensors
rcomp info model.safetensors --json | jq .history
rcomp info --models
rcomp info --attacks --json"""


@dataclass
class InfoOptions:
    json: bool = json_opt()
    models: bool = opt(False, "--models", kind="bool", help="List the architectures the registry knows.")
    datasets: bool = opt(False, "--datasets", kind="bool", help="List the datasets the registry knows.")
    attacks: bool = opt(False, "--attacks", kind="bool",
                        help="List the attacks, built in and from installed plugins, with the options each takes.")
    importances: bool = opt(False, "--importances", kind="bool",
                            help="List the pruning importances (--method), built in and from installed plugins.")

    def listing(self) -> str | None:
        return next((k for k in ("models", "datasets", "attacks", "importances") if getattr(self, k)), None)


def _kv(d: dict | None) -> str:
    return ", ".join(f"{printable(k)}={printable(v)}" for k, v in (d or {}).items() if not isinstance(v, (dict, list)))


def _print_human(d: dict[str, Any]) -> None:
    from tabulate import tabulate

    p = printable
    rows = [
        ("path", p(d["path"], limit=None)),
        ("architecture", p(d["arch"]) + (f" {p(d['arch_kwargs'])}" if d["arch_kwargs"] else "")),
        ("input", f"{'x'.join(map(str, d['input']['shape']))} in [0, 1], mean {d['input']['mean']}, "
                  f"std {d['input']['std']}"),
        ("classes", f"{d['num_classes']}" + (f": {p(', '.join(map(str, d['class_names'])), limit=400)}"
                                              if d["class_names"] else "")),
        ("dataset", p(d["dataset"] or "-")),
        ("parameters", f"{d['params']:,}"),
        ("file size", f"{d['size_bytes']:,} bytes"),
        ("sha256", d["sha256"]),
        ("format", f"rcomp checkpoint v{d['format_version']}" if "onnx" not in d else
         f"ONNX opset {d['onnx'].get('opset')} ({p(d['onnx'].get('exporter', '-'))} exporter), exported from "
         f"{p((d['onnx'].get('source') or {}).get('path', '-'))}"),
    ]
    if d["quantization"]:
        rows.append(("quantization", _kv(d["quantization"])))
    if d["pruning"]:
        rows.append(("pruning", _kv(d["pruning"])))
    print(tabulate(rows, tablefmt="plain", disable_numparse=True))
    if d["layers"]:
        print("\nresized layers (shape attributes after pruning):")
        print(tabulate([(p(name), _kv(attrs)) for name, attrs in d["layers"].items()], headers=["module", "shape"],
                       tablefmt="simple"))
    if d["history"]:
        print("\nhistory:")
        hrows = []
        for i, h in enumerate(d["history"], 1):
            params = _clip([f"{p(k)}={_fmt(v)}" for k, v in (h.get("params") or {}).items() if v is not None])
            metrics = _clip([f"{p(k)}={_fmt(v)}" for k, v in (h.get("metrics") or {}).items()])
            hrows.append((i, p(h.get("command")), p(h.get("time")), params, metrics,
                          p(h.get("input_sha256") or "-")[:12]))
        print(tabulate(hrows, headers=["#", "command", "time (UTC)", "parameters", "metrics", "input sha256"],
                       tablefmt="simple", disable_numparse=True))


def _fmt(v):
    if isinstance(v, dict) and "per_class" in v and "of" in v:  # which points a figure covers
        return f"{v.get('n')}/{v.get('of')} {printable(v.get('sampling'))}"
    return f"{v:.4g}" if isinstance(v, float) else printable(v)


def _entry_dict(e) -> dict[str, Any]:
    return {"help": e.help, "paper": e.paper, "takes": list(e.takes), "plugin": e.plugin}


def _print_entries(entries, width: int = 14) -> None:
    for e in entries:
        extra = f" (plugin from {printable(e.plugin)})" if e.plugin else ""
        takes = f" [takes: {', '.join(e.takes)}]" if e.takes else ""
        paper = f"; {e.paper}" if e.paper else ""
        print(f"{printable(e.name):{width}s} {printable(e.help)}{paper}{takes}{extra}")


def _list_catalogue(cat, as_json: bool) -> None:
    entries = cat.entries()
    if as_json:
        emit_json({e.name: _entry_dict(e) for e in entries})
        return
    _print_entries(entries)


def _clip(items: list[str], width: int = 80) -> str:
    """``a=1, b=2, ...``: whole items up to ``width`` characters, never a value cut in two (``lr=0`` for 0.003)."""
    out = ""
    for i, item in enumerate(items):
        text = item if not out else f"{out}, {item}"
        if len(text) > width and out:
            return f"{out}, ... ({len(items) - i} more)"
        out = text
    return out


def _list_models(as_json: bool) -> None:
    from rcomp.models.catalog import ARCHITECTURES, SOURCES
    from rcomp.models.registry import torchvision_names
    from rcomp.models.timm_source import EXTRA, installed_version, names

    entries = ARCHITECTURES.entries()
    if as_json:
        emit_json({"builtin": sorted(e.name for e in entries if not e.plugin),
                   "plugins": {e.name: _entry_dict(e) for e in entries if e.plugin},
                   "torchvision": torchvision_names(), "timm": names(),
                   "sources": {e.name: {"help": e.help, "form": e.get("form")} for e in SOURCES.entries()}})
        return
    for e in sorted(entries, key=lambda e: (e.plugin is not None, e.name)):
        shape = e.get("input")
        where = f" (plugin from {printable(e.plugin)})" if e.plugin else ""
        print(f"{printable(e.name):16s} {printable(e.help)}"
              + (f" [default input {'x'.join(map(str, shape))}]" if shape else "") + where)
    print("torchvision:     NAME (e.g. --arch resnet18): " + ", ".join(torchvision_names()))
    version = installed_version()
    print("timm:            timm:NAME, any model timm.list_models() names, built without downloading weights "
          + (f"(timm {version})" if version else f"(needs the optional extra: {EXTRA})"))
    print("user factory:    package.module:factory (imported only when named on the command line)")


def _list_datasets(as_json: bool) -> None:
    from rcomp.data.catalog import DATASETS

    entries = DATASETS.entries()
    if as_json:
        emit_json({e.name: {"num_classes": e.get("num_classes"), "shape": e.get("shape"), "help": e.help,
                            "plugin": e.plugin} for e in entries})
        return
    for e in entries:
        print(f"{printable(e.name):14s} {printable(e.help)}" + (f" (plugin from {printable(e.plugin)})" if e.plugin else ""))


def _list(what: str, as_json: bool) -> None:
    if what == "models":
        return _list_models(as_json)
    if what == "datasets":
        return _list_datasets(as_json)
    if what == "attacks":
        from rcomp.attacks.catalog import ATTACKS

        return _list_catalogue(ATTACKS, as_json)
    from rcomp.pruning.catalog import IMPORTANCES

    return _list_catalogue(IMPORTANCES, as_json)


def info(cfg: InfoOptions, inputs: list[Path]) -> None:
    from rcomp.io.describe import describe

    if cfg.listing():
        return _list(cfg.listing(), cfg.json)
    if str(inputs[0]).lower().endswith(".onnx"):  # a file written by rcomp export
        from rcomp.onnx.fileio import describe_onnx

        d = describe_onnx(inputs[0])
    else:
        d = describe(inputs[0])
    if cfg.json:
        emit_json(d)
    else:
        _print_human(d)


def _inputs_or_hint(cfg: InfoOptions, given: Path | None) -> list[Path]:
    if cfg.listing():
        return []
    if given is None and (sys.stdin is None or sys.stdin.isatty()):
        raise RcompError("give a checkpoint to describe (rcomp info CKPT), or --models / --datasets / --attacks / "
                         "--importances")
    return [checkpoint_path(given)]


def register(app: typer.Typer) -> None:
    make_command(app, "info", InfoOptions, "one", info, help_text(SUMMARY, DOC, EXAMPLES), with_config=False,
                 resolve=_inputs_or_hint)
