"""The convert stage: plain weights (safetensors or a weights-only PyTorch state_dict) -> rcomp checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcomp import options as O
from rcomp.errors import RcompError
from rcomp.stages import common as C

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMALIZE = ("imagenet", "none")

SUMMARY = "Turn plain weights into an rcomp checkpoint (weights + everything needed to rebuild the model)."
DOC = """State dicts are read with torch.load(weights_only=True), never full pickle; `module.` and
`model.` key prefixes are stripped; a key or shape mismatch is reported by name. The input
normalisation used is always printed: for torchvision models at their native 3x224x224 it defaults to
ImageNet's; at any other input shape give --mean/--std or --normalize imagenet|none. With --data, the
converted model's clean accuracy is measured and a near-chance result is reported as an error. For
timm models (--arch timm:NAME, the rcomp[timm] extra) the input size, mean and std default to the
model's pretrained config inside timm (nothing is downloaded); --input-shape/--mean/--std win."""
EXAMPLES = """rcomp convert resnet18.pth --arch resnet18 --num-classes 1000 -o resnet18.safetensors
rcomp convert cifar_weights.safetensors --arch resnet18-cifar --mean 0.4914,0.4822,0.4465 \\
  --std 0.2470,0.2435,0.2616 --dataset cifar10
rcomp convert r18.pth --arch resnet18 --input-shape 3,32,32 --normalize none --data cifar10
rcomp convert model.safetensors --arch timm:convnext_atto -o convnext_atto.rcomp.safetensors"""


@dataclass
class Config:
    arch: str | None = O.opt(None, "--arch", help="Registry name (rcomp info --models) or package.module:factory.",
                           file_check=C.user_factory_from_file)
    num_classes: int | None = O.opt(None, "--num-classes", kind="int", min=1, max=10**6,
                                  help="Classes (default: read from the weights).")
    input_shape: tuple[int, int, int] | None = O.opt(None, "--input-shape", kind="shape",
                                                   help="C,H,W (default: the architecture's).")
    mean: tuple[float, ...] | None = O.opt(None, "--mean", kind="floats",
                                         help="Per-channel mean, e.g. 0.485,0.456,0.406.")
    std: tuple[float, ...] | None = O.opt(None, "--std", kind="floats", help="Per-channel std, e.g. 0.229,0.224,0.225.")
    normalize: str | None = O.opt(None, "--normalize", kind="choice", choices=NORMALIZE,
                                help="Instead of --mean/--std: imagenet (torchvision's) or none (inputs used as "
                                     "they are). Default: imagenet for torchvision models at 3x224x224.")
    arch_kwargs: dict = O.opt(None, "--arch-kwargs", kind="json", help="JSON constructor arguments.")
    dataset: str | None = O.opt(None, "--dataset", help="Dataset the weights were trained on, if known.")
    data: str | None = O.opt(None, "--data", help="Measure clean accuracy on this dataset's test split after "
                                                "converting (catches a wrong normalisation).")
    data_dir: Path | None = O.data_dir_opt()
    eval_n: int = O.opt(500, "--eval-n", kind="int", min=1, max=10**8, help="Test images for --data.")
    output: Path | None = O.output_opt()
    force: bool = O.force_opt()
    json: bool = O.json_opt()

    def check(self) -> None:
        if not self.arch:
            raise RcompError("give --arch NAME (rcomp info --models lists them), e.g. --arch resnet18")
        if (self.mean is None) != (self.std is None):
            raise RcompError("give --mean and --std together (one value per channel)")
        if self.normalize and self.mean is not None:
            raise RcompError("give either --normalize or --mean/--std, not both")
        C.check_data(self.data, self.data_dir)


def _pretrained_source(arch: str):
    """The source of ``PREFIX:NAME`` that ships each model's pretrained config (timm), else None."""
    from rcomp.models.catalog import prefix_source

    src = prefix_source(arch)
    return src if src is not None and src.get("pretrained_input") else None


def _normalisation(cfg: Config, shape) -> tuple[list[float] | None, list[float] | None, str]:
    """mean/std from the options; a guess is said on stderr, and refused where it would be a blind one."""
    from rcomp.models.catalog import ARCHITECTURES

    if cfg.mean is not None:
        return list(cfg.mean), list(cfg.std), "given"
    src = _pretrained_source(cfg.arch)
    if src is not None and cfg.normalize is None:  # e.g. timm ships each model's pretrained config
        from rcomp.catalog import Entry

        found = Entry("pretrained_input", src.get("pretrained_input")).load()(cfg.arch)
        if found is not None and len(found[1]) == shape[0]:
            return found[1], found[2], (f"from {src.name}'s pretrained config for {found[3]}; give --normalize none "
                                        "or --mean/--std if the weights were trained otherwise")
    is_tv = ":" not in cfg.arch and cfg.arch not in ARCHITECTURES
    norm = cfg.normalize
    if norm is None and is_tv and shape[0] == 3:
        if tuple(shape) != (3, 224, 224):
            raise RcompError(f"{cfg.arch} at input shape {','.join(map(str, shape))} is not at its native 3x224x224, "
                             "so ImageNet normalisation cannot be assumed: give --normalize imagenet|none or "
                             "--mean/--std as the weights were trained")
        note = ("ImageNet's, assumed for a torchvision model at 3x224x224; give --normalize none or --mean/--std "
                "if the weights were trained otherwise")
        return list(IMAGENET[0]), list(IMAGENET[1]), note
    if norm == "imagenet":
        if shape[0] != 3:
            raise RcompError("--normalize imagenet needs 3 input channels; give --mean/--std")
        return list(IMAGENET[0]), list(IMAGENET[1]), "ImageNet's (--normalize imagenet)"
    return None, None, "none (inputs used as they are)" if norm == "none" else "none given: mean 0, std 1"


def _check_shape(cfg: Config, shape, log) -> None:
    """With --data (or --dataset), the input spec must fit the data's images: a defaulted shape whose size
    differs is refused with the fix; a given one that differs is said (images are resized)."""
    from rcomp.data.catalog import DATASETS
    from rcomp.data.registry import native_shape

    name = cfg.data or (cfg.dataset if cfg.dataset in DATASETS and cfg.dataset != "imagefolder" else None)
    if not name:
        return
    (c, h, w), _ = native_shape(name, cfg.data_dir)
    if tuple(shape[1:]) == (h, w):
        return
    opt = "--data" if cfg.data else "--dataset"
    if cfg.input_shape is None:
        raise RcompError(f"{cfg.arch}'s default input shape {'x'.join(map(str, shape))} does not match {opt} {name}'s "
                         f"{c}x{h}x{w} images; give the shape the weights were trained at, e.g. --input-shape "
                         f"{shape[0]},{h},{w}, with --normalize imagenet|none or --mean/--std")
    log(f"note: {opt} {name} has {c}x{h}x{w} images; they are resized to the given --input-shape "
        f"{'x'.join(map(str, shape))}")


def _check_accuracy(model, cfg: Config, log) -> dict[str, Any]:
    from rcomp.data.registry import check_fits, get_dataset, make_loader
    from rcomp.evaluation.accuracy import clean_accuracy

    test = get_dataset(cfg.data, "test", model.meta.input, cfg.data_dir, log=log)
    check_fits(test, model.meta.num_classes, cfg.data)
    correct, n = clean_accuracy(model, make_loader(test, 128, n=cfg.eval_n))
    acc, chance = correct / n, 1.0 / model.meta.num_classes
    log(f"clean accuracy on {cfg.data} test ({n} images): {acc:.4f}")
    if acc < 2 * chance:
        raise RcompError(f"the converted model scores {acc:.3f} on {cfg.data}, near chance ({chance:.3f}): "
                         "the normalisation or input shape is probably wrong; give --mean/--std (or --normalize) "
                         "as the weights were trained")
    return {"clean_acc": acc, "eval_n": n}


def convert(cfg: Config, src: Path, log=C.stderr_log) -> C.StageResult:
    """Read the weights -> build the model -> record the history entry (nothing is written)."""
    from rcomp.io.header import sha256_file
    from rcomp.models.convert import convert_state_dict
    from rcomp.models.registry import default_input_shape

    if not src.is_file():
        raise RcompError(f"{src} does not exist or is not a file; check the path")
    shape = cfg.input_shape or default_input_shape(cfg.arch)
    src_cfg = _pretrained_source(cfg.arch)
    if cfg.input_shape is None and src_cfg is not None:
        log(f"input size {'x'.join(map(str, shape))} from {src_cfg.name}'s pretrained config for {cfg.arch} "
            "(give --input-shape C,H,W to change it)")
    _check_shape(cfg, shape, log)
    mean, std, note = _normalisation(cfg, shape)
    kwargs = dict(cfg.arch_kwargs or {})
    model = convert_state_dict(src, cfg.arch, cfg.num_classes, shape, mean, std, kwargs, dataset=cfg.dataset)
    log(f"input: {'x'.join(map(str, shape))} in [0, 1]; normalisation mean {model.meta.input.mean}, "
        f"std {model.meta.input.std} ({note})")
    metrics = _check_accuracy(model, cfg, log) if cfg.data else None
    params = {"src": str(src), "arch": cfg.arch, "num_classes": model.meta.num_classes, "input_shape": list(shape),
              "mean": model.meta.input.mean, "std": model.meta.input.std, "arch_kwargs": kwargs}
    entry = C.record(model, "convert", params, sha256_file(src), metrics)
    return C.StageResult(model=model, entry=entry, report={"params": C.parameters(model), **(metrics or {})})


def run(cfg: Config, inputs: list, *, log=C.stderr_log, default_output: bool = True, **_: Any) -> C.StageResult:
    """Convert -> save (without ``cfg.output``: beside the input, or with ``default_output=False``, the
    Python API, nothing is written)."""
    src = Path(inputs[0])
    if not src.is_file():
        raise RcompError(f"{src} does not exist or is not a file; check the path")
    out = C.plan_output(cfg.output, src, "rcomp", cfg.force, default=default_output)
    res = C.publish(convert(cfg, src, log), out, cfg.force, (src,))
    if out is not None:
        log(f"converted {src} -> {out} ({C.parameters(res.model):,} parameters, sha256 {res.sha256[:12]})")
    return res
