"""Adapt images to a model's input spec: grey <-> RGB and resize, staying in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rcomp.errors import RcompError
from rcomp.spec import InputSpec

_LUMA = (0.299, 0.587, 0.114)


def adapt_images(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """``x``: (N, C, H, W) or (C, H, W) float in [0, 1]; returns images of ``spec.shape``."""
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    c = x.shape[1]
    if c != spec.channels:
        if c == 1:
            x = x.expand(-1, spec.channels, -1, -1)
        elif c == 3 and spec.channels == 1:
            w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        else:
            raise RcompError(f"cannot adapt {c}-channel images to a {spec.channels}-channel model")
    if tuple(x.shape[-2:]) != (spec.height, spec.width):
        down = x.shape[-2] > spec.height or x.shape[-1] > spec.width
        x = F.interpolate(x, size=(spec.height, spec.width), mode="bilinear", align_corners=False, antialias=down)
    x = x.clamp(0.0, 1.0).contiguous()
    return x[0] if single else x
