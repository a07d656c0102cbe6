"""The one small interface rcomp uses over torch.ao's FX graph-mode quantization.

Everything that touches ``torch.ao.quantization`` lives here, so the backend can be swapped
(e.g. for PT2E/torchao) without touching the rest of :mod:`rcomp.quant`. torch.ao warns that it
is deprecated on every call in torch 2.14; :func:`silenced` hides those warnings inside rcomp's
own calls only (never globally).

The functions:

* :func:`prepare` -- fold BatchNorm into the preceding convolutions, trace with FX and insert
  fake-quant modules (``prepare_qat_fx``): weights symmetric per output channel, activations
  affine per tensor, both observed with MinMax observers. The result (the *fake-quant twin*)
  computes in fp32 but carries the rounding of the low-bit model; its gradients are
  straight-through (Bengio et al. 2013; Jacob et al. 2018).
* :func:`calibrate` / :func:`freeze` -- observe activation ranges on calibration batches with
  fake-quant off (plain post-training calibration), then fix the ranges and switch fake-quant on.
* :func:`convert` -- turn a frozen 8-bit twin into a real int8 module (``convert_fx``) that runs on
  the quantized CPU kernels of the chosen engine.

Defaults: ``backend="x86"``. Real int8 on x86/fbgemm uses activations in [0, 127]
(``reduce_range``, as torch's default x86 qconfig, to avoid int16 overflow on CPUs without VNNI);
qnnpack uses [0, 255]. Weights use the symmetric range [-(2^(b-1)-1), 2^(b-1)-1] (qnnpack's
requirement; e.g. ternary {-1, 0, 1} at 2 bits). Simulated models use the full [0, 2^b-1] for
activations.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

from rcomp.errors import RcompError
from rcomp.quant.catalog import BACKEND_INFO, BACKENDS, INT8, PT2E, SIMULATED, TORCH_AO, bits_of, runtime
from rcomp.signals import reraise_interrupt

SIM_BITS = bits_of(SIMULATED)
REAL_BITS = bits_of(INT8)


@contextlib.contextmanager
def silenced():
    """Hide torch.ao's advisory warnings for the duration of rcomp's call; its deprecations only when the
    command line spares users (never in the API or the tests: see :mod:`rcomp.deprecations`)."""
    from rcomp.deprecations import users_spared

    with warnings.catch_warnings():
        if users_spared():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
        not_deprecation = r"(?!.*deprecat)"
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao.*", message=not_deprecation)
        warnings.filterwarnings("ignore", category=UserWarning, message=not_deprecation + r".*(quantiz|observer|Fake).*")
        yield


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise RcompError(f"--backend {backend!r} is not supported; choose one of {', '.join(BACKENDS)}")
    if runtime(backend) == PT2E:
        from rcomp.quant.pt2e import require_onednn

        require_onednn()
        return backend
    if backend not in torch.backends.quantized.supported_engines:
        raise RcompError(f"--backend {backend}: this torch build has no {backend} engine; "
                         f"use one of {', '.join(e for e in BACKENDS if e in torch.backends.quantized.supported_engines)}")
    return backend


def ranges(bits: int, backend: str, real: bool) -> dict[str, int]:
    """Integer ranges: activations (affine, unsigned) and weights (symmetric, signed)."""
    act_max = 2**bits - 1
    if real and BACKEND_INFO[backend][1]:
        act_max = 127
    wq = 2 ** (bits - 1) - 1
    return {"act_min": 0, "act_max": act_max, "w_min": -wq, "w_max": wq}


def _qconfig(bits: int, backend: str, real: bool):
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig

    from rcomp.quant.fakequant import (
        FastFakeQuantize as FakeQuantize,  # torch's FakeQuantize, faster rounding
    )

    r = ranges(bits, backend, real)
    adt, wdt = (torch.quint8, torch.qint8) if bits <= 8 else (torch.qint32, torch.qint32)
    act = FakeQuantize.with_args(observer=MinMaxObserver, quant_min=r["act_min"], quant_max=r["act_max"],
                                 dtype=adt, qscheme=torch.per_tensor_affine)
    wgt = FakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=r["w_min"], quant_max=r["w_max"],
                                 dtype=wdt, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfig(activation=act, weight=wgt)


def _backend_config(bits: int, backend: str):
    """torch.ao's backend config; above 8 bits its dtypes are widened to qint32 (simulation only)."""
    from torch.ao.quantization.backend_config import BackendConfig, DTypeWithConstraints

    from rcomp.catalog import Entry

    base = Entry(backend, BACKEND_INFO[backend][0]).load()()
    if bits <= 8:
        return base
    d = base.to_dict()
    for cfg in d.get("configs", []):
        for dc in cfg.get("dtype_configs", []):
            for k, v in list(dc.items()):
                dt = v.dtype if isinstance(v, DTypeWithConstraints) else v
                if k.endswith("_dtype") and dt in (torch.quint8, torch.qint8):
                    dc[k] = torch.qint32
    return BackendConfig.from_dict(d)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Trace ``net`` with FX and fold each BatchNorm into the convolution before it (eval statistics)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(net).eval(), inplace=True)
    except Exception as exc:  # symbolic tracing failed: data-dependent control flow etc.
        raise RcompError(f"cannot trace this network with torch.fx for quantization ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160]}); quantize a traceable architecture") from None


@contextlib.contextmanager
def _no_stack_traces():
    """torch.ao's tracer records a Python stack trace on every node (debugging metadata rcomp never reads), and
    symbolising the first one imports torch._dynamo: 3.3 s on the first quantized model a process loads."""
    import torch.fx.config as fx_config

    saved = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = saved


def prepare(net: nn.Module, example: torch.Tensor, bits: int, backend: str, real: bool,
            folded: nn.Module | None = None) -> nn.Module:
    """The fake-quant twin of ``net`` (BatchNorm folded), observers on and fake-quant off, eval mode.
    ``folded``: ``fold_batchnorm(net)`` when the caller traced it already (it is used up)."""
    from torch.ao.quantization import QConfigMapping, disable_fake_quant, enable_observer
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    folded = fold_batchnorm(net) if folded is None else folded
    folded.train()
    with silenced(), _no_stack_traces():
        try:
            fq = prepare_qat_fx(folded, QConfigMapping().set_global(_qconfig(bits, backend, real)), (example,),
                                backend_config=_backend_config(bits, backend))
        except Exception as exc:
            reraise_interrupt(exc)
            raise RcompError(f"torch.ao could not prepare this network for quantization ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160]})") from None
    fq.apply(disable_fake_quant)
    fq.apply(enable_observer)
    return fq.eval()


@torch.no_grad()
def calibrate(fq: nn.Module, batches) -> int:
    """Run the (normalised) ``batches`` through ``fq`` so its observers see the ranges; returns images seen."""
    n = 0
    with silenced():
        for x in batches:
            fq(x)
            n += x.shape[0]
    return n


def freeze(fq: nn.Module) -> nn.Module:
    """Fix every observed range and switch fake-quant on."""
    from torch.ao.quantization import disable_observer, enable_fake_quant

    fq.apply(disable_observer)
    fq.apply(enable_fake_quant)
    return fq


def set_weight_observers(fq: nn.Module, enabled: bool) -> None:
    """Let weight ranges follow the weights (training) or keep them fixed; activation ranges stay fixed."""
    for mod in fq.modules():
        wfq = getattr(mod, "weight_fake_quant", None)
        if wfq is not None:
            wfq.observer_enabled[0] = 1 if enabled else 0


def weight_quantizers(fq: nn.Module) -> dict[str, nn.Module]:
    """``{module name: weight fake-quant}`` for every quantized convolution and linear layer."""
    return {name: mod.weight_fake_quant for name, mod in fq.named_modules() if hasattr(mod, "weight_fake_quant")}


def outside_range(fq: nn.Module, ints: dict[str, torch.Tensor]) -> str | None:
    """What in a loaded twin lies outside its integer range (a zero point, integer weights), else None: the
    int8 kernels would compute with it silently."""
    from torch.ao.quantization import FakeQuantizeBase

    for name, m in fq.named_modules():
        if isinstance(m, FakeQuantizeBase) and m.zero_point.numel():
            z = m.zero_point
            if bool(((z < m.quant_min) | (z > m.quant_max)).any()):
                return (f"quantization zero point {name} holds {int(z.min())}..{int(z.max())}, outside its integer "
                        f"range [{m.quant_min}, {m.quant_max}]")
    wq = weight_quantizers(fq)
    for name, q in ints.items():
        w = wq[name]
        if q.numel() and bool(((q < w.quant_min) | (q > w.quant_max)).any()):
            return (f"integer weights of {name} hold {int(q.min())}..{int(q.max())}, outside their range "
                    f"[{w.quant_min}, {w.quant_max}]")
    return None


def int_weights(fq: nn.Module) -> dict[str, torch.Tensor]:
    """Integer weights exactly as ``fq``'s fake-quant rounds them (``{module name: int tensor}``)."""
    out = {}
    modules = dict(fq.named_modules())
    with torch.no_grad():
        for name, wfq in weight_quantizers(fq).items():
            w = modules[name].weight.detach()
            deq = wfq(w)
            shape = [-1] + [1] * (w.dim() - 1)
            q = torch.round(deq / wfq.scale.view(shape)) + wfq.zero_point.view(shape)
            out[name] = q.to(torch.int64)
    return out


def set_int_weights(fq: nn.Module, ints: dict[str, torch.Tensor]) -> None:
    """Replace ``fq``'s float weights by ``(q - zero_point) * scale``: the same rounding, exactly."""
    modules = dict(fq.named_modules())
    with torch.no_grad():
        for name, q in ints.items():
            wfq = modules[name].weight_fake_quant
            shape = [-1] + [1] * (q.dim() - 1)
            w = (q.to(torch.float32) - wfq.zero_point.view(shape).float()) * wfq.scale.view(shape)
            modules[name].weight.data = w.contiguous()


def set_engine(backend: str) -> None:
    """The quantized engine is a process-wide setting; int8 modules run on the one they were packed for."""
    if torch.backends.quantized.engine != backend:
        torch.backends.quantized.engine = backend


def convert(fq: nn.Module, backend: str, example_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A real int8 module from a frozen 8-bit fake-quant twin (``fq`` itself is left untouched): torch.ao's
    ``convert_fx`` (deprecated runtime) or, for the pt2e backend, the twin on oneDNN int8 kernels (rcomp.quant.pt2e)
    (``example_shape``: one input's shape, for pt2e's probe run)."""
    if runtime(backend) == PT2E:
        from rcomp.quant.pt2e import lower

        return lower(fq, example_shape)
    assert runtime(backend) == TORCH_AO
    from torch.ao.quantization.quantize_fx import convert_fx

    set_engine(backend)
    with silenced():
        q = convert_fx(copy.deepcopy(fq), backend_config=_backend_config(8, backend))
    return q.eval()


def int8_of(qnet: nn.Module, fq: nn.Module, backend: str) -> dict[str, torch.Tensor]:
    """The integer weights of a real int8 model: read from torch.ao's packed modules, or (pt2e, whose lowered
    graph holds packed oneDNN weights) from the twin's own rounding, which the pt2e graph was built from."""
    return int_weights(fq) if runtime(backend) == PT2E else int8_weights(qnet)


def int8_weights(qnet: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: int8 weight}`` of a converted module's quantized convolutions and linears."""
    out = {}
    for name, mod in qnet.named_modules():
        w = getattr(mod, "weight", None)
        if callable(w) and not isinstance(w, torch.Tensor):
            t = w()
            if isinstance(t, torch.Tensor) and t.is_quantized:
                out[name] = t.int_repr().to(torch.int64)
    return out
