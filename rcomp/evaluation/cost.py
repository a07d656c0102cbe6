"""Cost of a model: parameters, MACs, file size, latency (median and spread over repeats)."""

from __future__ import annotations

import time

import torch


def _counted(net):
    """The network whose layers are counted: a lowered int8 graph (pt2e) names the twin it was built from."""
    cost_net = getattr(net, "cost_net", None)
    return cost_net() if callable(cost_net) else net


def count_params(model) -> int:
    """Parameters of the network (normalisation buffers excluded); int8 models count their packed weights;
    an ONNX model (rcomp.onnx.runtime.OnnxClassifier) the weights stored in its file."""
    if getattr(model, "is_onnx", False):
        return int(model.param_count or 0)
    net = _counted(model.net if hasattr(model, "net") else model)
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


#: a latency whose slowest repeat is more than this many times its fastest is flagged as untrustworthy
UNSTEADY_RATIO = 1.5


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(times_ms: list[float], *, batch: int, threads: int, warmup: int) -> dict:
    """Summary of repeated timings: median, quartiles, IQR, min, max, max/min, and whether to trust it.

    ``steady`` is False when the slowest repeat took more than :data:`UNSTEADY_RATIO` times the
    fastest (a busy machine); ``note`` says so in words, with the batch and threads measured."""
    t = sorted(float(v) for v in times_ms)
    if not t:
        raise ValueError("latency_stats needs at least one timing")
    ratio = t[-1] / t[0] if t[0] > 0 else float("inf")
    steady = ratio <= UNSTEADY_RATIO
    med = _quantile(t, 0.5)
    q1, q3 = _quantile(t, 0.25), _quantile(t, 0.75)
    note = (f"batch {batch}, {threads} thread{'s' if threads != 1 else ''}: median {med:.3g} ms "
            f"(IQR {q1:.3g}-{q3:.3g}, min {t[0]:.3g}, max {t[-1]:.3g}) over {len(t)} repeats after {warmup} warm-up")
    if not steady:
        note += f"; UNSTEADY: max/min {ratio:.2f} > {UNSTEADY_RATIO} (a busy machine?), do not trust this figure"
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": t[0], "max_ms": t[-1],
            "max_over_min": ratio, "steady": steady, "reps": len(t), "warmup": warmup, "batch": batch,
            "threads": threads, "note": note}


@torch.inference_mode()
def measure_latency(model, input_shape: tuple[int, int, int], batch: int, device: str = "cpu", warmup: int = 3,
                    reps: int = 10, timer=time.perf_counter) -> dict:
    """Forward latency of a batch of ``batch`` images: :func:`latency_stats` over ``reps`` timed repeats
    after ``warmup`` untimed ones, with the batch and ``torch.get_num_threads()`` recorded."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps}, {warmup}")
    from rcomp.attacks.base import eval_mode

    x = torch.rand(batch, *input_shape, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    with eval_mode(model):  # the caller's modes come back after timing
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(reps):
            sync()
            t0 = timer()
            model(x)
            sync()
            times.append((timer() - t0) * 1000)
    return latency_stats(times, batch=batch, threads=torch.get_num_threads(), warmup=warmup)


def latency_ms(model, input_shape: tuple[int, int, int], batch: int, device: str = "cpu", warmup: int = 3,
               reps: int = 10) -> float:
    """Median forward latency in milliseconds for a batch of ``batch`` images (see :func:`measure_latency`
    for the spread, threads and trust flag)."""
    return measure_latency(model, input_shape, batch, device, warmup, reps)["median_ms"]


def count_macs(model, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of the convolution and linear layers for one image (forward hooks).

    The same definition for float, pruned, fake-quant and real int8 models (torch.ao's quantized
    Conv2d/Linear expose the same shape attributes), so figures compare across a bench table.
    Running the forward pass also checks that the network still runs. An ONNX model reports the MACs of
    the checkpoint it was exported from (recorded at export), or raises when none were recorded.
    """
    if getattr(model, "is_onnx", False):
        if model.macs is None:
            raise ValueError("this ONNX file records no MACs")
        return int(model.macs)
    net = _counted(model.net if hasattr(model, "net") else model)
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
