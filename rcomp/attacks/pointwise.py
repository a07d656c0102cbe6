"""Per-point randomness: each image's random draws depend only on the seed and on the image.

Random starts drawn from one generator for a whole batch depend on which other images share the
batch, so the same point gets a different start in a cascade (which attacks only the survivors)
than in an independent run, or with another batch size. The attacks of the ``auto`` suite draw
instead from a counter-based hash of (seed, stream, image content, coordinate) -- in the spirit
of counter-based generators (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC
2011) -- so a point's examples are the same whatever batch it comes in. That is what makes the
cascade's final figure equal the per-example worst case of the same attacks run independently.
"""

from __future__ import annotations

import torch

from rcomp.attacks.base import _bcast, flat_norm

_M = 0x7FFFFFFF  # keep every value below 2**31 so products stay inside int64


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (multiply-xorshift rounds); input and output in [0, 2**31)."""
    for c in (0x45D9F3B, 0x2C1B3C6D):
        h = ((h ^ (h >> 16)) * c) & _M
    return h ^ (h >> 16)


def point_keys(x: torch.Tensor) -> torch.Tensor:
    """One 31-bit key per image (N, ...) -> (N,), from its pixels at 16-bit resolution."""
    f = (x.detach().flatten(1).clamp(0, 1) * 65535).round().long()
    w = _mix(torch.arange(1, f.shape[1] + 1, device=x.device))
    return _mix((f * w).sum(1) & _M)


def point_uniform(keys: torch.Tensor, seed: int, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform numbers in [0, 1) of shape (N, *shape), a function of (key, seed, stream, coordinate) only."""
    count = 1
    for s in shape:
        count *= int(s)
    base = _mix((keys + int(_mix(torch.tensor(int(seed) % _M)))) & _M)
    base = _mix((base + int(stream) % _M) & _M)
    idx = torch.arange(count, device=keys.device)
    h = _mix((base[:, None] + _mix(idx)[None, :]) & _M)
    return (h.double() / 2**31).float().view(-1, *shape)


def point_signs(keys: torch.Tensor, seed: int, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Random +-1 of shape (N, *shape), per point as :func:`point_uniform`."""
    return (point_uniform(keys, seed, stream, shape) < 0.5).float() * 2 - 1


def point_normal(keys: torch.Tensor, seed: int, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal numbers (Box-Muller) of shape (N, *shape), per point."""
    u1 = point_uniform(keys, seed, 2 * stream, shape).clamp(min=1e-7)
    u2 = point_uniform(keys, seed, 2 * stream + 1, shape)
    return (-2 * u1.log()).sqrt() * torch.cos(2 * torch.pi * u2)


class PointwiseStart:
    """Mixin for :class:`~rcomp.attacks.apgd.APGD` and subclasses: the random start of restart
    ``r`` (a point of the eps sphere, as APGD's own) drawn per point with :func:`point_uniform`."""

    def _start(self, x: torch.Tensor, restart: int) -> torch.Tensor:
        if not self.random_start_on:  # type: ignore[attr-defined]
            return x.clone()
        keys = point_keys(x)
        shape = tuple(x.shape[1:])
        if self.norm == "linf":  # type: ignore[attr-defined]
            t = point_uniform(keys, self.seed, restart + 1, shape) * 2 - 1  # type: ignore[attr-defined]
        else:
            t = point_normal(keys, self.seed, restart + 1, shape)  # type: ignore[attr-defined]
        t = t / _bcast(flat_norm(t, self.norm) + 1e-12, t)  # type: ignore[attr-defined]
        return (x + self.eps * t).clamp(0.0, 1.0)  # type: ignore[attr-defined]
