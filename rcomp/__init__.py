"""rcomp: compress PyTorch image classifiers and measure and restore their adversarial robustness.

The Python API (the CLI is a thin layer over it)::

    import rcomp
    model = rcomp.load("model.safetensors")          # nn.Module taking [0, 1] images
    model.meta.input, model.meta.history              # input spec, provenance
    rcomp.save(model, "copy.safetensors")            # atomic, refuses to overwrite unless force=True
    net = rcomp.build_model("convnet8", num_classes=10, input_shape=(1, 8, 8))
    test = rcomp.get_dataset("digits", "test", net.meta.input)

The stages take the command line's options as keywords and record provenance on the model::

    model = rcomp.finetune(arch="convnet8", data="digits", epochs=20).model      # from scratch
    model = rcomp.prune(model, ratio=0.5).model
    res = rcomp.finetune(model, data="digits", adv="pgd", eps=0.1, epochs=3, output="robust.safetensors")
    res.model, res.report, res.path                  # history: finetune, prune, finetune
    report = rcomp.bench([res.model], data="digits", attack="auto", eps=0.1).report

Every stage function returns an :class:`rcomp.Result` (``.model``, ``.report``, ``.path``).

torch is imported lazily: ``import rcomp`` is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "load": ("rcomp.models.loading", "load"),
    "save": ("rcomp.models.loading", "save"),
    "read_header": ("rcomp.io.header", "read_header"),
    "build_model": ("rcomp.models.registry", "build_model"),
    "list_models": ("rcomp.models.registry", "list_models"),
    "get_dataset": ("rcomp.data.registry", "get_dataset"),
    "make_loader": ("rcomp.data.registry", "make_loader"),
    "Classifier": ("rcomp.models.wrapper", "Classifier"),
    "InputSpec": ("rcomp.spec", "InputSpec"),
    "CheckpointMeta": ("rcomp.io.format", "CheckpointMeta"),
    "RcompError": ("rcomp.errors", "RcompError"),
    # the stages, with the command line's options (rcomp.api), and what each returns
    "Result": ("rcomp.api", "Result"),
    "convert": ("rcomp.api", "convert"),
    "prune": ("rcomp.api", "prune"),
    "quantize": ("rcomp.api", "quantize"),
    "finetune": ("rcomp.api", "finetune"),
    "attack": ("rcomp.api", "attack"),
    "bench": ("rcomp.api", "bench"),
    "export": ("rcomp.api", "export"),
}

__all__ = ["__version__", *_API]


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


def __getattr__(name: str):
    if name in _API:
        import importlib

        mod, attr = _API[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'rcomp' has no attribute {name!r}")
