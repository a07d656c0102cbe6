"""The pt2e int8 runtime: rcomp's fake-quant twin as a pt2e QDQ graph, lowered by torchao to oneDNN kernels.

torch.ao's eager/FX int8 runtime (``convert_fx``: modules with packed quantized tensors) is deprecated.
torchao's pt2e flow describes an int8 model as an exported graph of ``quantized_decomposed``
quantize/dequantize ops around float convolutions and linears (a *QDQ* graph); its x86 inductor
passes (registered by importing ``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer``) fuse
each ``dequantize -> conv/linear (+relu) -> quantize`` into a oneDNN int8 kernel with pre-packed weights.

rcomp's int8 file already is a QDQ description: the frozen fake-quant twin (:mod:`rcomp.quant.backend`)
holds every activation's scale, zero point and integer range and every layer's integer weights and
per-channel scales. :func:`qdq_graph` writes that twin as the pt2e graph, with exactly its ranges
(activations [0, 127] where the twin has them), so the int8 model computes what the stored file means
without a new calibration or a new file layout; :func:`lower` exports it with a dynamic batch size
and runs torchao's lowering (the same steps as ``torchao.quantization.pt2e.lowering
.lower_pt2e_quantized_to_x86``, which pins the batch size). The result runs eagerly (no code
generation); :func:`compiled` adds ``torch.compile`` (inductor) for more speed at a compile cost per
input shape. Gradients still come from the twin (a lowered graph has no autograd).

Measured reason and figures: docs/quantization.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from rcomp.errors import RcompError
from rcomp.quant.catalog import PT2E_EXTRA
from rcomp.quant.catalog import require_pt2e as require

_loaded = False
#: the inductor settings torch.compile of a pt2e int8 graph needs; set only around its calls (see :func:`compiled`)
_COMPILE_SETTINGS: dict = {}


def load_torchao() -> None:
    """Import torchao's pt2e x86 passes once (their import registers inductor's int8 fusions).

    torchao's import also sets a process-wide inductor setting (``pre_grad_custom_pass``), which would change
    how the caller's own ``torch.compile`` works; rcomp puts the caller's value back and applies torchao's only
    around its own compiled calls. torchao logs a torch pytree notice at import (``register_constant()`` on an
    Enum); it is torchao's, says nothing a user can act on, and is kept off the terminal here."""
    global _loaded
    if _loaded:
        return
    require()
    import torch._inductor.config as inductor_config

    before = inductor_config.pre_grad_custom_pass
    log = logging.getLogger("torch.utils._pytree")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except Exception as exc:  # a broken or mismatched torchao install
        raise RcompError(f"torchao could not be imported for --backend pt2e ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]}); reinstall it: {PT2E_EXTRA}") from None
    finally:
        log.setLevel(level)
        _COMPILE_SETTINGS.update(freezing=True, pre_grad_custom_pass=inductor_config.pre_grad_custom_pass)
        inductor_config.pre_grad_custom_pass = before
    _loaded = True


def _ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


class DequantLayer(nn.Module):
    """A convolution or linear layer on integer weights: ``dequantize_per_channel`` then the float op.

    The weights, scales and zero points are plain attributes (not buffers), so ``torch.export`` makes them
    graph constants, which is what the lowering's weight-packing patterns require."""

    def __init__(self, layer: nn.Module, weight_q: torch.Tensor, relu: bool):
        super().__init__()
        wfq = layer.weight_fake_quant
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.is_conv else None
        self.relu = relu
        self.weight_q = weight_q.to(torch.int8).contiguous()
        self.scale = wfq.scale.detach().float().clone()
        self.zero_point = wfq.zero_point.detach().to(torch.int64).clone()
        self.axis = int(wfq.ch_axis)
        self.qrange = (int(wfq.quant_min), int(wfq.quant_max))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _ops().dequantize_per_channel.default(self.weight_q, self.scale, self.zero_point, self.axis,
                                                  self.qrange[0], self.qrange[1], torch.int8)
        if self.is_conv:
            s, p, d, g = self.conv_args
            y = F.conv2d(x, w, self.bias, s, p, d, g)
        else:
            y = F.linear(x, w, self.bias)
        return F.relu(y) if self.relu else y


#: torch.ao QAT modules (by class name) the pt2e graph knows: name -> applies ReLU after the layer
_LAYERS = {"Conv2d": False, "ConvReLU2d": True, "Linear": False, "LinearReLU": True}


def qdq_graph(fq: nn.Module) -> torch.fx.GraphModule:
    """The frozen twin ``fq`` as a pt2e QDQ graph: each activation fake-quant becomes quantize + dequantize
    with its scale, zero point and range; each quantized layer a :class:`DequantLayer` on its integer weights.
    Computes what ``fq`` computes (tested bit for bit on convnet8 and resnet18-cifar). ``fq`` is unchanged."""
    from torch.ao.quantization import FakeQuantizeBase

    from rcomp.quant import backend as qb

    ints = qb.int_weights(fq)
    gm = copy.deepcopy(fq)
    g = gm.graph
    ops = _ops()
    for node in list(g.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, FakeQuantizeBase):
            s, z = mod.scale.detach(), mod.zero_point.detach()
            if s.numel() != 1 or mod.qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                raise RcompError("--backend pt2e: this network quantizes an activation per channel, which the pt2e "
                                 "int8 lowering does not take; use --backend x86")
            args = (float(s), int(z), int(mod.quant_min), int(mod.quant_max), torch.uint8)
            with g.inserting_after(node):
                q = g.call_function(ops.quantize_per_tensor.default, (node.args[0], *args))
            with g.inserting_after(q):
                dq = g.call_function(ops.dequantize_per_tensor.default, (q, *args))
            node.replace_all_uses_with(dq)
            g.erase_node(node)
        elif hasattr(mod, "weight_fake_quant"):
            kind = type(mod).__name__
            if kind not in _LAYERS or (kind.startswith("Conv") and not isinstance(mod, nn.Conv2d)):
                raise RcompError(f"--backend pt2e: layer {node.target} ({kind}) is not one the pt2e int8 graph "
                                 "takes (2-d convolutions and linears); use --backend x86")
            gm.add_submodule(node.target, DequantLayer(mod, ints[node.target], _LAYERS[kind]))
    g.lint()
    gm.recompile()
    return gm.eval()


def _decompositions():
    """The decompositions torchao's lowering uses: only the composite-implicit ones (keeps prim ops)."""
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        if not torch._export.utils._is_cia_op(op):
            del table[op]
    return table


class Pt2eInt8(nn.Module):
    """The lowered int8 network (a GraphModule on oneDNN int8 kernels); runs without autograd.
    ``settings``: inductor settings applied around each call (compiled graphs only), never left set."""

    def __init__(self, gm: torch.fx.GraphModule, twin: nn.Module | None = None, settings: dict | None = None):
        super().__init__()
        self.gm = gm
        self._twin = [twin] if twin is not None else []  # not a submodule: never saved, never trained
        self._settings = dict(settings or {})

    def cost_net(self) -> nn.Module:
        """The network whose layers parameter and MAC counts read: the twin (same layers; the lowered graph
        keeps its weights packed inside oneDNN ops)."""
        return self._twin[0] if self._twin else self.gm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._compile_settings():
            return self.gm(x)

    def _compile_settings(self):
        """Compiled graphs: inductor compiles (per new shape) inside the call, under the settings it needs."""
        if not self._settings:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(self._settings)

    def train(self, mode: bool = True):
        """An inference graph: there is no training mode to switch (the exported graph refuses it)."""
        self.training = False
        return self


def lower(fq: nn.Module, example_shape: tuple[int, ...] | None) -> Pt2eInt8:
    """The twin's QDQ graph exported with a dynamic batch size and lowered to oneDNN int8 kernels by
    torchao's x86 passes (freezing + constant folding), run eagerly."""
    if not example_shape:
        raise RcompError("--backend pt2e needs the model's input shape to trace it; the checkpoint records none")
    load_torchao()
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    graph = qdq_graph(fq)
    example = (torch.zeros(2, *example_shape),)
    batch = torch.export.Dim("batch", min=1, max=2**20)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._(export|dynamo|inductor).*")
        try:
            gm = torch.export.export(graph, example, dynamic_shapes=({0: batch},), strict=False) \
                .run_decompositions(_decompositions()).module()
            for node in list(gm.graph.nodes):  # as torchao's lowering: aten.t -> permute (the linear patterns)
                if node.target == torch.ops.aten.t.default:
                    with gm.graph.inserting_before(node):
                        perm = gm.graph.call_function(torch.ops.aten.permute.default, (node.args[0], [1, 0]))
                    node.replace_all_uses_with(perm)
                    gm.graph.erase_node(node)
            gm.graph.lint()
            gm.recompile()
            with torch.no_grad():
                freezing_passes(gm, example)
                constant_fold(gm)
        except RcompError:
            raise
        except Exception as exc:
            raise RcompError(f"--backend pt2e could not lower this network ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160]}); use --backend x86") from None
    return Pt2eInt8(gm, fq).eval()


def compiled(net: nn.Module) -> nn.Module:
    """``torch.compile`` (inductor, freezing on) of a pt2e int8 network: faster, at a compile cost per input
    shape (see docs/quantization.md); the uncompiled net is the reference it must agree with. The inductor
    settings it needs (freezing, torchao's pre-grad pass) hold only during its calls: the caller's own
    ``torch.compile`` is not changed."""
    load_torchao()
    if isinstance(net, Pt2eInt8):
        return Pt2eInt8(torch.compile(net.gm, dynamic=False), net.cost_net(), _COMPILE_SETTINGS)
    return Pt2eInt8(torch.compile(net, dynamic=False), None, _COMPILE_SETTINGS)


def fused_ops(net: nn.Module) -> list[str]:
    """Names of the oneDNN int8 ops in a lowered graph (the evidence that lowering took place)."""
    gm = net.gm if isinstance(net, Pt2eInt8) else net
    return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "onednn" in str(n.target)})
