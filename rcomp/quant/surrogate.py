"""The gradient surrogate of a real int8 model: its fake-quant twin.

Real int8 modules have no autograd, so attacks (and adversarial fine-tuning) craft examples on
the fake-quant twin -- the same network with the same integer ranges, computing in fp32, with
straight-through gradients through the rounding (Bengio et al. 2013, "Estimating or Propagating
Gradients Through Stochastic Neurons"; Jacob et al. 2018) -- and measure accuracy on the real
int8 forward pass. Attach it with ``model.set_gradient_model(FakeQuantTwin(...))``; attacks and
reports read ``model.gradient_source``, which is :attr:`FakeQuantTwin.description`.
"""

from __future__ import annotations

import torch
from torch import nn

DESCRIPTION = "fake-quant twin (straight-through)"


class FakeQuantTwin(nn.Module):
    """``fq(normalize(x))``: takes [0, 1] images like the Classifier it stands in for."""

    description = DESCRIPTION

    def __init__(self, normalize: nn.Module, fq: nn.Module, meta=None):
        super().__init__()
        self.normalize = normalize
        self.fq = fq
        self.meta = meta
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fq(self.normalize(x))
