"""The pt2e int8 runtime: rcomp's fake-quant twin on oneDNN's int8 kernels, the ones torchao's pt2e x86 lowering targets.

torch.ao's eager/FX int8 runtime (``convert_fx``: modules with packed quantized tensors) is deprecated.
torchao's pt2e flow describes an int8 model as an exported graph of ``quantized_decomposed``
quantize/dequantize ops around float convolutions and linears (a *QDQ* graph) and lowers it for x86 by
fusing each ``dequantize -> conv/linear (+relu) -> quantize`` into a oneDNN int8 kernel with pre-packed
weights (``torch.ops.onednn.qconv_pointwise`` / ``qlinear_pointwise``, part of torch itself).

rcomp's int8 file already is a QDQ description: the frozen fake-quant twin (:mod:`rcomp.quant.backend`)
holds every activation's scale, zero point and integer range and every layer's integer weights and
per-channel scales. :func:`qdq_graph` writes that twin as the pt2e graph, with exactly its ranges
(activations [0, 127] where the twin has them), so the int8 model computes what the stored file means
without a new calibration or a new file layout. :func:`lower` builds the lowered graph straight from the
twin: the same oneDNN calls with the same arguments that torchao's lowering of :func:`qdq_graph` makes
(tests compare the two bit for bit where torchao is installed), in milliseconds instead of the 6-76 s of
``torch.export``, decompositions and freezing passes, and with the element-wise work between kernels done
in fewer passes. torchao is not needed to run it. The result runs eagerly; :func:`compiled` adds
``torch.compile`` (inductor) at a compile cost per input shape. Gradients still come from the twin (the
lowered graph has no autograd).

Measured reason and figures: docs/quantization.md.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import operator

import torch
import torch.nn.functional as F
from torch import nn

from rcomp.errors import RcompError
from rcomp.signals import reraise_interrupt


class Pt2eUnsupported(RcompError):
    """The pt2e int8 runtime cannot take this network (or this torch build has no oneDNN int8 kernels); where the
    user did not name a backend, :func:`rcomp.quant.ptq.quantize` writes a torch.ao x86 file instead and says so
    (``reason``: why, without the ``--backend`` advice)."""

    def __init__(self, reason: str, fix: str = "use --backend x86"):
        self.reason = reason
        super().__init__(f"--backend pt2e: {reason}; {fix}")


def _act_qparams(m: nn.Module) -> tuple[float, int, int, int]:
    """An activation quantizer's (scale, zero point, min, max); per-channel ones have no pt2e int8 form."""
    s = m.scale.detach()
    if s.numel() != 1 or m.qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise Pt2eUnsupported("this network quantizes an activation per channel, which the pt2e int8 runtime does "
                              "not take")
    return float(s), int(m.zero_point), int(m.quant_min), int(m.quant_max)


def _layer_relu(name: str, mod: nn.Module) -> bool:
    """Whether the quantized layer ``mod`` applies ReLU; layers other than 2-d convolutions and linears are refused."""
    kind = type(mod).__name__
    if kind not in _LAYERS or (kind.startswith("Conv") and not isinstance(mod, nn.Conv2d)):
        raise Pt2eUnsupported(f"layer {name} ({kind}) is not one the pt2e int8 runtime takes (2-d convolutions and "
                              "linears)")
    return _LAYERS[kind]


#: the inductor settings torch.compile of a pt2e int8 graph needs (its packed weights must be graph constants);
#: set only around its calls (see :func:`compiled`)
_COMPILE_SETTINGS: dict = {"freezing": True}


def _ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


class DequantLayer(nn.Module):
    """A convolution or linear layer on integer weights: ``dequantize_per_channel`` then the float op (the pt2e
    QDQ form of a quantized layer; :func:`lower` uses it only for a layer with no activation quantizer in front).

    The weights, scales and zero points are plain attributes (not buffers), so ``torch.export`` makes them
    graph constants, which is what torchao's weight-packing patterns require."""

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
            args = (*_act_qparams(mod), torch.uint8)
            with g.inserting_after(node):
                q = g.call_function(ops.quantize_per_tensor.default, (node.args[0], *args))
            with g.inserting_after(q):
                dq = g.call_function(ops.dequantize_per_tensor.default, (q, *args))
            node.replace_all_uses_with(dq)
            g.erase_node(node)
        elif hasattr(mod, "weight_fake_quant"):
            gm.add_submodule(node.target, DequantLayer(mod, ints[node.target], _layer_relu(node.target, mod)))
    g.lint()
    gm.recompile()
    return gm.eval()


@contextlib.contextmanager
def _quiet_logger(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


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
        """Compiled graphs: inductor compiles (per new shape) inside the call, under the settings it needs, and
        without torch's 'No CUDA runtime is found, using CUDA_HOME=...' log line (inductor looks for a CUDA
        toolkit even for a CPU graph; nothing a user of a CPU model can act on)."""
        if not self._settings:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        stack = contextlib.ExitStack()
        stack.enter_context(inductor_config.patch(self._settings))
        stack.enter_context(_quiet_logger("torch.utils.cpp_extension"))
        return stack

    def train(self, mode: bool = True):
        """An inference graph: there is no training mode to switch (the exported graph refuses it)."""
        self.training = False
        return self


class Int8Layer(nn.Module):
    """A quantized convolution or linear on oneDNN's int8 kernels (``onednn.qconv_pointwise`` /
    ``qlinear_pointwise``, weights pre-packed once): uint8 activations in, uint8 out at the next activation's
    scale and zero point (``out``), or float32 where no activation quantizer follows. ReLU is fused."""

    def __init__(self, layer: nn.Module, weight_q: torch.Tensor, relu: bool, x_qparams: tuple[float, int],
                 out_qparams: tuple[float, int] | None):
        super().__init__()
        wfq = layer.weight_fake_quant
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.x_scale, self.x_zp = x_qparams
        self.w_scale = wfq.scale.detach().float().clone()
        self.w_zp = wfq.zero_point.detach().to(torch.int64).clone()
        self.bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self.out = out_qparams
        self.attr = "relu" if relu else "none"
        self.weight_q = weight_q.to(torch.int8).contiguous()
        self.conv_args = (list(layer.stride), list(layer.padding), list(layer.dilation), int(layer.groups)) \
            if self.is_conv else None
        self.packed = self._pack()

    def _pack(self) -> torch.Tensor:
        """oneDNN's packed weights (an opaque tensor: it cannot be copied, so a copy packs again)."""
        if self.is_conv:
            return torch.ops.onednn.qconv_prepack(self.weight_q, self.w_scale, self.x_scale, self.x_zp,
                                                  *self.conv_args, None)
        return torch.ops.onednn.qlinear_prepack(self.weight_q, None)

    def __getstate__(self):
        """A copy leaves the packed weights out (torch cannot copy an opaque tensor) and packs them again."""
        state = self.__dict__.copy()
        state.pop("packed", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.packed = self._pack()

    def forward(self, qx: torch.Tensor) -> torch.Tensor:
        scale, zp, dtype = (*self.out, torch.uint8) if self.out else (1.0, 0, torch.float32)
        if self.is_conv:
            return torch.ops.onednn.qconv_pointwise.default(
                qx, self.x_scale, self.x_zp, self.packed, self.w_scale, self.w_zp, self.bias, *self.conv_args,
                scale, zp, dtype, self.attr, [], "")
        return torch.ops.onednn.qlinear_pointwise.default(
            qx, self.x_scale, self.x_zp, self.packed, self.w_scale, self.w_zp, self.bias, scale, zp, dtype,
            self.attr, [], "")


def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32: ``quantized_decomposed.dequantize_per_tensor``'s arithmetic,
    in one new tensor instead of three."""
    t = q.to(torch.float32)
    if zero_point:
        t.sub_(zero_point)
    return t.mul_(scale)


def quantize(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point)`` as uint8: ``quantize_per_tensor``'s arithmetic (the same float
    operations in the same order, so the same bits), in one new float tensor instead of four."""
    t = x * (1.0 / scale)
    t.round_()
    if zero_point:
        t.add_(zero_point)
    return t.clamp_(quant_min, quant_max).to(torch.uint8)


def quantize_into(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """:func:`quantize` computed in ``x`` itself: used only where ``x`` is a float temporary nothing else reads."""
    x.mul_(1.0 / scale).round_()
    if zero_point:
        x.add_(zero_point)
    return x.clamp_(quant_min, quant_max).to(torch.uint8)


def add_into(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` written into ``a``: used only where ``a`` is a dequantized temporary nothing else reads."""
    return a.add_(b)


def _bounds(node: torch.fx.Node, mods: dict) -> tuple[float | None, float | None] | None:
    """``(low, high)`` when ``node`` is a clamp-like op (relu, relu6, hardtanh), else None."""
    F_ = torch.nn.functional
    if node.op == "call_module":
        m = mods.get(node.target)
        if type(m) is nn.ReLU:
            return (0.0, None)
        if type(m) in (nn.ReLU6, nn.Hardtanh):
            return (float(m.min_val), float(m.max_val))
        return None
    if node.op == "call_function" and not node.kwargs and len(node.args) == 1:
        if node.target in (F_.relu, torch.relu):
            return (0.0, None)
        if node.target is F_.relu6:
            return (0.0, 6.0)
    return None


def _moves(node: torch.fx.Node, mods: dict) -> bool:
    """Ops that only move or drop values: exact on the integers too. (Not max-pool, though it would be exact:
    torch's uint8 max_pool2d refuses planes of more than 255 elements, 'Expected input_depth * input_height *
    input_width <= std::numeric_limits<integer_t>::max()', as timm's resnet18 stem showed.)"""
    if node.op == "call_module":
        m = mods.get(node.target)
        return type(m) in (nn.Flatten, nn.Identity) or (type(m) is nn.Dropout and not m.training)
    if node.op == "call_function":
        return node.target is torch.flatten
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape")


def clamp_int(q: torch.Tensor, low: int, high: int) -> torch.Tensor:
    return q.clamp(low, high)


def _integer_domain(g: torch.fx.Graph, mods: dict) -> None:
    """``quantize(f(dequantize(q)))`` at one scale and zero point, for f a clamp (relu, relu6, hardtanh) or a
    move (flatten, view, identity), is f on the integers: quantization is monotone and gives back every
    integer it dequantizes (|(q - z) * s / s - (q - z)| < 1e-4 in float32 for |q - z| <= 255), so it
    commutes with clamps, and the clamp to the quantizer's range is the only other step. One uint8
    pass instead of four float ones (mobilenet's ReLU6 after every convolution)."""
    for deq in list(g.nodes):
        if deq.target is not dequantize or len(deq.users) != 1:
            continue
        f = next(iter(deq.users))
        if len(f.users) != 1 or f.args[0] is not deq or any(a is deq for a in list(f.args[1:]) + list(f.kwargs.values())):
            continue
        quant = next(iter(f.users))
        if quant.target is not quantize or quant.args[1:3] != deq.args[1:3]:
            continue
        scale, zp, qmin, qmax = quant.args[1:5]
        bounds = _bounds(f, mods)
        if bounds is not None:
            lo, hi = (qmin if v is None else int(quantize(torch.tensor([v]), scale, zp, qmin, qmax)) for v in bounds)
            with g.inserting_before(quant):
                new = g.call_function(clamp_int, (deq.args[0], lo, hi))
        elif _moves(f, mods):
            f.replace_input_with(deq, deq.args[0])
            with g.inserting_before(quant):
                new = g.call_function(clamp_int, (f, qmin, qmax)) if (qmin, qmax) != (0, 255) else f
        else:
            continue
        quant.replace_all_uses_with(new)
        g.erase_node(quant)
        if bounds is not None:
            g.erase_node(f)
        g.erase_node(deq)


def require_onednn() -> None:
    """Refuse in one line where this torch build has no oneDNN int8 kernels (the pt2e runtime)."""
    ok = torch.backends.mkldnn.is_available()
    try:
        ok = ok and hasattr(torch.ops.onednn, "qconv_pointwise") and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        ok = False
    if not ok:
        raise Pt2eUnsupported("it runs on oneDNN's int8 kernels, which this torch build lacks",
                              "use --backend x86 (or qnnpack on ARM)")


def lower(fq: nn.Module, example_shape: tuple[int, ...] | None = None) -> Pt2eInt8:
    """The frozen twin ``fq`` on oneDNN int8 kernels, built straight from its FX graph (no export, no torchao):
    every quantized layer whose input is an activation quantizer becomes an :class:`Int8Layer` taking that
    activation as uint8 and, where exactly one activation quantizer reads its output, writing uint8 at that
    quantizer's scale; every other activation quantizer becomes :func:`quantize`, and a float op reading a
    quantized value gets :func:`dequantize`. This is the graph torchao's x86 lowering makes of
    :func:`qdq_graph` (same kernels, same arguments; tests compare the outputs bit for bit), made in
    milliseconds instead of the 6-76 s of ``torch.export`` + decompositions + freezing passes, and without
    torchao's per-call input guards. Any batch size; ``example_shape`` (one input's shape): run the graph once on
    a probe input of that shape (:func:`_probe`)."""
    from torch.ao.quantization import FakeQuantizeBase

    from rcomp.quant import backend as qb

    require_onednn()
    ints = qb.int_weights(fq)
    mods = dict(fq.named_modules(remove_duplicate=False))  # one observer may sit at two places
    root = copy.deepcopy(fq)
    g = torch.fx.Graph()
    flt: dict = {}    # twin node -> new node holding its float value
    qval: dict = {}   # activation-quantizer node -> (new node holding its uint8 value, its qparams)
    fused: dict = {}  # quantized layer node -> new node already holding its output quantizer's uint8 value

    def is_fq(n) -> bool:
        return isinstance(n, torch.fx.Node) and n.op == "call_module" and \
            isinstance(mods.get(n.target), FakeQuantizeBase)

    def qparams(n) -> tuple[float, int, int, int]:
        return _act_qparams(mods[n.target])

    def as_float(n):
        if not isinstance(n, torch.fx.Node) or n in flt:
            return flt.get(n, n)
        q, (s, z, _, _) = qval[n]
        flt[n] = g.call_function(dequantize, (q, s, z))
        return flt[n]

    for node in fq.graph.nodes:
        if is_fq(node):
            p, src = qparams(node), node.args[0]
            qval[node] = (fused[src] if src in fused else g.call_function(quantize, (as_float(src), *p)), p)
            continue
        mod = mods.get(node.target) if node.op == "call_module" else None
        if mod is not None and hasattr(mod, "weight_fake_quant"):
            relu = _layer_relu(node.target, mod)
            src, users = node.args[0], list(node.users)
            if is_fq(src):
                out = users[0] if len(users) == 1 and is_fq(users[0]) else None
                root.add_submodule(node.target, Int8Layer(mod, ints[node.target], relu, qparams(src)[:2],
                                                          qparams(out)[:2] if out is not None else None))
                new = g.call_module(node.target, (qval[src][0],))
                (fused if out is not None else flt)[node] = new
            else:  # no quantizer in front (torch.ao always puts one): the float op on the integer weights
                root.add_submodule(node.target, DequantLayer(mod, ints[node.target], relu))
                flt[node] = g.call_module(node.target, (as_float(src),))
            continue
        flt[node] = new = g.node_copy(node, as_float)
        if new.op == "call_method" and new.target == "view":
            # oneDNN's int8 kernels write channels-last tensors, which `x.view(n, -1)` (common after the last
            # convolution) refuses; reshape gives the same values (and views where it can)
            new.target = "reshape"
    new_mods = dict(root.named_modules(remove_duplicate=False))
    _integer_domain(g, new_mods)
    for n in g.nodes:  # a sum whose first term is a dequantized temporary read once: add in place
        a = n.args[0] if n.op == "call_function" and len(n.args) == 2 and not n.kwargs else None
        if n.target in (operator.add, torch.add) and isinstance(a, torch.fx.Node) and a.target is dequantize \
                and len(a.users) == 1 and a is not n.args[1]:
            n.target = add_into
    temps: set = set()  # float tensors the graph made for one reader: a dequantized value, a sum, an in-place ReLU
    for n in g.nodes:
        src = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
        if n.target in (dequantize, add_into):
            temps.add(n)
        elif n.op == "call_module" and type(new_mods.get(n.target)) in (nn.ReLU, nn.ReLU6, nn.Hardtanh) \
                and getattr(new_mods[n.target], "inplace", False) and src in temps and len(src.users) == 1:
            temps.add(n)
        elif n.target is quantize and src in temps and len(src.users) == 1:
            n.target = quantize_into  # a quantize of such a temporary: in place
    g.lint()
    net = Pt2eInt8(torch.fx.GraphModule(root, g).eval(), fq).eval()
    if example_shape:
        _probe(net, example_shape)
    return net


def _probe(net: Pt2eInt8, shape: tuple[int, ...]) -> None:
    """Run the int8 graph once on two zero images: a network whose float ops do not take what the int8 kernels
    give them (a layout, a dtype) is refused here, in one line, not in the middle of a user's evaluation."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints a traced forward's failure itself
            out = net(torch.zeros(2, *shape))
    except Exception as exc:  # noqa: BLE001 - any failure of the network's own ops on the int8 graph
        reraise_interrupt(exc)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise Pt2eUnsupported(f"this network's int8 graph fails on a probe input ({type(exc).__name__}: "
                              f"{first})") from None
    if not isinstance(out, torch.Tensor):
        raise Pt2eUnsupported("this network's int8 graph does not return a tensor")


def compiled(net: nn.Module) -> nn.Module:
    """``torch.compile`` (inductor, freezing on) of a pt2e int8 network: faster, at a compile cost per input
    shape (see docs/quantization.md); the uncompiled net is the reference it must agree with. The inductor
    setting it needs (freezing) holds only during its calls: the caller's own ``torch.compile`` is not changed."""
    if isinstance(net, Pt2eInt8):
        return Pt2eInt8(torch.compile(net.gm, dynamic=False), net.cost_net(), _COMPILE_SETTINGS)
    return Pt2eInt8(torch.compile(net, dynamic=False), None, _COMPILE_SETTINGS)


def fused_ops(net: nn.Module) -> list[str]:
    """Names of the oneDNN int8 ops in a lowered graph (the evidence that lowering took place)."""
    gm = net.gm if isinstance(net, Pt2eInt8) else net
    gm = getattr(gm, "_orig_mod", gm)
    names = {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "onednn" in str(n.target)}
    for n in gm.graph.nodes:
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, Int8Layer):
            names.add(f"onednn.{'qconv' if mod.is_conv else 'qlinear'}_pointwise.default")
    return sorted(names)
