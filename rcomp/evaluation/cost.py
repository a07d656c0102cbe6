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


def count_macs(model, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates for one image, counted with torch-pruning on the float network.

    For a quantized model pass its float twin (MACs do not change with the number format).
    """
    import torch_pruning as tp

    net = model.net if hasattr(model, "net") else model
    dev = next((p.device for p in net.parameters()), torch.device("cpu"))
    x = torch.zeros(1, *input_shape, device=dev)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(net, x)
    finally:
        net.train(was_training)
    return int(macs)


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
