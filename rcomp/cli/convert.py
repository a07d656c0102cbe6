"""``rcomp convert``: a plain safetensors file or a PyTorch state_dict -> rcomp checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcomp.cli.common import (
    ConfigOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    emit_json,
    emit_path,
    log,
    parse_floats,
    parse_json_kwargs,
    parse_shape,
    resolve_output,
)
from rcomp.errors import RcompError


def convert(
    src: Annotated[Path, typer.Argument(help="A .safetensors file of plain weights, or a .pt/.pth state_dict.")],
    arch: Annotated[str, typer.Option("--arch", help="Registry name (rcomp info --models) or package.module:factory.")],
    num_classes: Annotated[int | None, typer.Option("--num-classes", help="Classes (default: read from the weights).",
                                                    show_default=False)] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="C,H,W (default: the architecture's).",
                                                    show_default=False)] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406 (default: "
                                                            "ImageNet's for torchvision models, else 0).",
                                             show_default=False)] = None,
    std: Annotated[str | None, typer.Option("--std", help="Per-channel std (default: ImageNet's for torchvision "
                                                          "models, else 1).", show_default=False)] = None,
    arch_kwargs: Annotated[str | None, typer.Option("--arch-kwargs", help="JSON constructor arguments.",
                                                    show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset the weights were trained on, if known.",
                                                show_default=False)] = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Turn plain weights into an rcomp checkpoint (weights + everything needed to rebuild the model).

    State dicts are read with torch.load(weights_only=True), never full pickle; `module.` and
    `model.` key prefixes are stripped; a key or shape mismatch is reported by name.

    Examples:

      rcomp convert resnet18.pth --arch resnet18 --num-classes 1000 -o resnet18.safetensors

      rcomp convert cifar_weights.safetensors --arch resnet18-cifar --mean 0.4914,0.4822,0.4465 \\
        --std 0.2470,0.2435,0.2616 --dataset cifar10
    """
    from rcomp.convert import convert_state_dict
    from rcomp.io.checkpoint import save
    from rcomp.io.format import history_entry
    from rcomp.io.header import sha256_file
    from rcomp.models.builtin import BUILTINS
    from rcomp.models.registry import default_input_shape

    src = Path(src)
    if not src.is_file():
        raise RcompError(f"{src} does not exist or is not a file; check the path")
    shape = parse_shape(input_shape) if input_shape else default_input_shape(arch)
    is_tv = arch not in BUILTINS and ":" not in arch
    mean_v = parse_floats(mean, "--mean") if mean else ([0.485, 0.456, 0.406] if is_tv and shape[0] == 3 else None)
    std_v = parse_floats(std, "--std") if std else ([0.229, 0.224, 0.225] if is_tv and shape[0] == 3 else None)
    out = resolve_output(output, src, "rcomp", force)
    model = convert_state_dict(src, arch, num_classes, shape, mean_v, std_v, parse_json_kwargs(arch_kwargs),
                               dataset=dataset)
    params = {"src": str(src), "arch": arch, "num_classes": model.meta.num_classes, "input_shape": list(shape),
              "mean": model.meta.input.mean, "std": model.meta.input.std, "arch_kwargs": parse_json_kwargs(arch_kwargs)}
    model.meta.history.append(history_entry("convert", params, sha256_file(src)))
    sha = save(model, out, force=force, inputs=(src,))
    log(f"converted {src} -> {out} ({model.num_parameters():,} parameters, sha256 {sha[:12]})")
    if json_out:
        emit_json({"path": str(out), "sha256": sha, "params": model.num_parameters()})
    else:
        emit_path(out)
