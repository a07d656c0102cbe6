"""Cost of a model: parameters, MACs, file size, latency."""

from __future__ import annotations

import time

import torch


def count_params(model) -> int:
    """Parameters of the network (normalisation buffers excluded); int8 models count their packed weights."""
    net = model.net if hasattr(model, "net") else model
    n = sum(p.numel() for p in net.parameters())
    if n == 0:  # real int8 modules keep their weights in packed params, not parameters
        for m in net.modules():
            w = getattr(m, "weight", None)
            if callable(w):
                try:
                    n += w().numel()
                    b = m.bias() if callable(getattr(m, "bias", None)) else None
                    n += b.numel() if b is not None else 0
                except Exception:  # noqa: BLE001
                    pass
    return n


@torch.inference_mode()
def latency_ms(model, input_shape: tuple[int, int, int], batch: int, device: str = "cpu", warmup: int = 3,
               reps: int = 10) -> float:
    """Median forward latency in milliseconds for a batch of ``batch`` images."""
    x = torch.rand(batch, *input_shape, device=device)
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def count_macs(model, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of the convolution and linear layers for one image (forward hooks).

    The same definition for float, pruned, fake-quant and real int8 models (torch.ao's quantized
    Conv2d/Linear expose the same shape attributes), so figures compare across a bench table.
    Running the forward pass also checks that the network still runs.
    """
    net = model.net if hasattr(model, "net") else model
    total = 0
    hooks = []

    def conv_hook(mod, inp, out):
        nonlocal total
        k = 1
        for d in mod.kernel_size:
            k *= d
        total += (out.numel() // out.shape[0]) * (mod.in_channels // mod.groups) * k

    def linear_hook(mod, inp, out):
        nonlocal total
        total += (out.numel() // out.shape[0]) * mod.in_features

    for m in net.modules():
        if hasattr(m, "kernel_size") and hasattr(m, "in_channels") and hasattr(m, "groups"):
            hooks.append(m.register_forward_hook(conv_hook))
        elif hasattr(m, "in_features") and hasattr(m, "out_features"):
            hooks.append(m.register_forward_hook(linear_hook))
    dev = next((t.device for t in list(net.parameters()) + list(net.buffers())), torch.device("cpu"))
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *input_shape, device=dev))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return int(total)
