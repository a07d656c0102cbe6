"""The model rcomp passes around: normalisation + network, fed [0, 1] images."""

from __future__ import annotations

import torch
from torch import nn

from rcomp.io.format import CheckpointMeta

#: what ``Classifier.gradient_source`` reports
GRAD_EXACT = "exact"
GRAD_STRAIGHT_THROUGH = "straight-through (fake-quant rounding)"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers so they travel with the weights."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """An image classifier that takes images in [0, 1] (N, C, H, W) and returns logits.

    ``meta`` (a :class:`~rcomp.io.format.CheckpointMeta`) describes the architecture, input
    spec, classes, compression state and history; it is what a checkpoint's header holds.
    """

    def __init__(self, net: nn.Module, meta: CheckpointMeta):
        super().__init__()
        self.normalize = Normalize(meta.input.mean, meta.input.std)
        self.net = net
        self.meta = meta
        self._surrogate: list[nn.Module] = []  # not a submodule: never saved
        self.source_path = None
        self.source_sha256 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    # ----- gradients for attacks ------------------------------------------
    def set_gradient_model(self, surrogate: nn.Module | None) -> None:
        """Attach a differentiable twin (e.g. the fake-quant twin of an int8 model)."""
        self._surrogate = [surrogate] if surrogate is not None else []

    def gradient_model(self) -> nn.Module:
        """The module attacks differentiate: this model, or its surrogate if it has no autograd."""
        return self._surrogate[0] if self._surrogate else self

    @property
    def gradient_source(self) -> str:
        """Which gradient attacks use, truthfully: ``exact`` for a float model; ``straight-through
        (fake-quant rounding)`` for a simulated low-bit model (its rounding has zero gradient, the
        fake-quant ops pass it straight through); for a model with an attached surrogate (a real
        int8 model has no autograd), what the surrogate says: its ``gradient_note`` (the
        quantization mode's note, e.g. ``fake-quant twin of int8``), else its ``description``."""
        if self._surrogate:
            s = self._surrogate[0]
            return getattr(s, "gradient_note", None) or getattr(s, "description", "surrogate")
        return GRAD_STRAIGHT_THROUGH if self.is_quantized else GRAD_EXACT

    @property
    def is_quantized(self) -> bool:
        return bool(self.meta.compression.get("quantization"))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def on_device(model: nn.Module, device) -> nn.Module:
    """``model`` itself when its parameters and buffers are already on ``device``, else a copy moved there: a
    model the caller handed to the Python API keeps its device (``rcomp.attack(m, device="cuda")`` must not
    move ``m``). A module without tensors (an ONNX model) is returned as is."""
    import copy

    import torch

    want = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == want.type and (want.index is None or t.device.index == want.index) for t in tensors):
        return model
    return copy.deepcopy(model).to(want)
