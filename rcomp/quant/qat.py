"""Quantization-aware fine-tuning: train the fake-quant twin, write the same format back.

``to_trainable(model)`` gives a module that takes [0, 1] images, computes like the quantized
model (fake-quant, straight-through gradients; Jacob et al. 2018) and has trainable float
weights starting from the quantized values. While in ``train()`` mode the weight ranges follow
the weights; activation ranges stay those of calibration. ``from_trainable(trainable, original)``
recomputes the weight scales, rounds the weights and rebuilds a Classifier in ``original``'s
format (int8 or simulated, same bits and backend), ready for ``rcomp.models.loading.save``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rcomp.errors import RcompError
from rcomp.quant import backend as qb
from rcomp.quant.assemble import assemble, finalize, twin_of


class Trainable(nn.Module):
    """normalize + fake-quant twin, trainable; ``meta`` is the quantized model's."""

    def __init__(self, normalize: nn.Module, fq: nn.Module, meta):
        super().__init__()
        self.normalize = normalize
        self.fq = fq
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fq(self.normalize(x))

    def train(self, mode: bool = True):
        super().train(mode)
        qb.set_weight_observers(self.fq, mode)
        return self


def to_trainable(model) -> Trainable:
    """A trainable fake-quant copy of the quantized Classifier ``model`` (``model`` is unchanged)."""
    if not model.is_quantized:
        raise RcompError("to_trainable needs a quantized model; quantize it first (rcomp quantize)")
    fq = copy.deepcopy(twin_of(model)).cpu()
    for p in fq.parameters():
        p.requires_grad_(True)
    t = Trainable(copy.deepcopy(model.normalize).cpu(), fq, copy.deepcopy(model.meta))
    return t.eval()


def _refresh_weight_ranges(fq: nn.Module) -> None:
    """Weight scales from the current weights alone (MinMax observers accumulate over training)."""
    modules = dict(fq.named_modules())
    with torch.no_grad():
        for name, wfq in qb.weight_quantizers(fq).items():
            obs = wfq.activation_post_process
            obs.reset_min_max_vals()
            obs(modules[name].weight.detach())
            scale, zp = wfq.calculate_qparams()
            wfq.scale.resize_(scale.shape).copy_(scale)
            wfq.zero_point.resize_(zp.shape).copy_(zp)


def from_trainable(trainable: Trainable, original):
    """The fine-tuned model in ``original``'s quantization format, with ``original``'s meta."""
    if not original.is_quantized:
        raise RcompError("from_trainable needs the quantized model the trainable copy came from")
    q = dict(original.meta.compression["quantization"])
    fq = copy.deepcopy(trainable.fq).cpu().eval()
    _refresh_weight_ranges(fq)
    fq = finalize(fq, q)
    for p in fq.parameters():
        p.requires_grad_(False)
    out = assemble(original, fq, q)  # meta and source come from the original
    out.normalize.load_state_dict(trainable.normalize.state_dict())
    return out
