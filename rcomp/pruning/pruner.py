"""Structured channel pruning: physically remove filters so the network gets smaller and faster.

Built on torch-pruning's dependency graph (Fang et al., "DepGraph: Towards Any Structural
Pruning", CVPR 2023): removing an output channel of one layer also removes the matching input
channels, batch-norm entries and coupled residual channels, so the result is a plain, dense,
smaller network. Importance criteria:

* ``l1`` (default) - filter L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017),
  the criterion of Thorsteinsson et al. (2024);
* ``l2`` - filter L2 norm;
* ``random`` - uniform random scores (a baseline; seeded);
* ``bn-scale`` - |gamma| of the following BatchNorm (Liu et al., "Network Slimming", ICCV 2017);
* ``taylor`` - first-order Taylor estimate |w * dL/dw| from data batches (Molchanov et al., CVPR 2019);
  with ``adv_eps`` the loss is taken on PGD adversarial examples (see :mod:`rcomp.pruning.robust`);
* ``hydra`` - channel scores learned against the adversarial loss with a straight-through top-k
  mask (Sehwag et al., "HYDRA", NeurIPS 2020; see :mod:`rcomp.pruning.robust`); needs ``adv_eps``.

``ratio`` is the fraction of channels removed from every prunable layer (``scope="local"``) or
from all layers ranked together (``scope="global"``). The classifier's outputs are never pruned.
The network inside the :class:`~rcomp.models.wrapper.Classifier` is pruned; normalisation stays
outside. The result saves with :func:`rcomp.models.loading.save` and reloads with no pickle.
"""

from __future__ import annotations

import copy
import difflib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rcomp.errors import RcompError
from rcomp.pruning.catalog import IMPORTANCES, SCOPES
from rcomp.signals import reraise_interrupt

#: The most a ratio search may remove; beyond this networks collapse to a channel or two per layer.
MAX_SEARCH_RATIO = 0.99


@dataclass
class PruneReport:
    """What one call of :func:`prune` did. ``ratio_reached`` is the fraction of channels (outputs of
    every Conv/Linear layer except the classifier) actually removed."""

    method: str
    scope: str
    ratio_requested: float
    ratio_reached: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels_before: int
    channels_after: int
    iterative: int = 1
    round_to: int | None = None
    ignored: list[str] = field(default_factory=list)
    classifier: str = ""
    target: dict[str, float] | None = None
    seconds: float = 0.0
    adversarial: dict[str, Any] | None = None

    @property
    def macs_factor(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_factor(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["macs_factor"] = round(self.macs_factor, 4)
        d["params_factor"] = round(self.params_factor, 4)
        return d


class _Tracker:
    """Remembers the last leaf module entered during a forward pass, to name a failing layer."""

    def __init__(self, net: nn.Module):
        self.net, self.last, self._hooks = net, None, []

    def __enter__(self):
        for name, mod in self.net.named_modules():
            if name and not any(True for _ in mod.children()):
                self._hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: setattr(self, "last", n)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def find_classifier(net: nn.Module, example: torch.Tensor) -> str:
    """Name of the layer that produces the logits (never pruned): the last Conv/Linear whose output
    *is* the network's output, else the last Linear (or Conv) registered."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if not layers:
        raise RcompError("the network has no Conv or Linear layer, so there is nothing to prune")
    outputs: dict[str, Any] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, o)) for n, m in layers]
    try:
        with torch.no_grad(), _Tracker(net) as tr:
            try:
                out = net(example)
            except Exception as exc:  # noqa: BLE001 - any failure of a user model becomes one line
                reraise_interrupt(exc)
                raise RcompError(f"the network fails on a {tuple(example.shape[1:])} input at layer {tr.last!r}: "
                                 f"{_first_line(exc)}; check the checkpoint's input spec") from None
    finally:
        for h in hooks:
            h.remove()
    hits = [n for n, _ in layers if outputs.get(n) is out]
    if hits:
        return hits[-1]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    return (linears or [n for n, _ in layers])[-1]


def prunable_channels(net: nn.Module, classifier: str) -> int:
    """Output channels of every Conv and Linear layer except the classifier."""
    total = 0
    for name, mod in net.named_modules():
        if name == classifier:
            continue
        if isinstance(mod, nn.modules.conv._ConvNd):
            total += mod.out_channels
        elif isinstance(mod, nn.Linear):
            total += mod.out_features
    return total


def resolve_ignore(net: nn.Module, ignore) -> list[str]:
    """Module paths inside ``net`` (a leading ``net.`` is accepted); an unknown name is a one-line error."""
    modules = dict(net.named_modules())
    names = []
    for raw in ignore or ():
        name = str(raw).strip()
        if not name:
            continue
        if name not in modules and name.startswith("net.") and name[4:] in modules:
            name = name[4:]
        if name not in modules or not name:
            layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
            close = difflib.get_close_matches(name, layers, n=3) or layers[:3]
            raise RcompError(f"--ignore {raw!r}: the network has no layer of that name; give module paths "
                             f"such as {', '.join(close)}")
        names.append(name)
    return names


# ----- the built-in importances (listed in rcomp.pruning.catalog) ----------------------------

def magnitude_l1():
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=1)


def magnitude_l2():
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)


def random_scores():
    import torch_pruning as tp

    return tp.importance.RandomImportance()


def bn_scale():
    import torch_pruning as tp

    return tp.importance.BNScaleImportance()


def taylor():
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance()


def taylor_prepare(net: nn.Module, importance, *, normalize: nn.Module, batches: list | None, adv: dict | None,
                   seed: int, **_: Any) -> None:
    """Gradients for the Taylor estimate, on adversarial examples when ``adv`` is given."""
    from rcomp.pruning import robust

    if adv:
        batches = robust.adversarial_batches(net, normalize, batches, adv["eps"], adv["attack_steps"], seed)
    _taylor_gradients(net, normalize, batches)


def _importance(method: str):
    """The torch-pruning importance of catalogue entry ``method`` (an unknown name is refused)."""
    return IMPORTANCES.load(method)()


def _taylor_gradients(net: nn.Module, normalize: nn.Module, batches: list) -> None:
    """Accumulate dL/dw over ``batches`` (cross-entropy, eval mode so BatchNorm statistics stay put)."""
    dev = next(net.parameters()).device
    net.zero_grad(set_to_none=True)
    for x, y in batches:
        x, y = x.to(dev), y.to(dev)
        F.cross_entropy(net(normalize(x)), y).backward()


def _rescore(method: str, net: nn.Module, importance, *, normalize: nn.Module, batches: list | None,
             adv: dict | None, keep: float, ignored: list[str], seed: int) -> None:
    """Prepare a data-driven importance before a pruning step (its catalogue entry's ``prepare``)."""
    prepare = IMPORTANCES.get(method).get("prepare")
    if prepare:
        from rcomp.catalog import Entry

        Entry("prepare", prepare).load()(net, importance, normalize=normalize, batches=batches, adv=adv, keep=keep,
                                         ignored=ignored, seed=seed)


def _prune_net(net: nn.Module, ratio: float, *, shape, method: str, scope: str, round_to: int | None,
               ignored: list[str], steps: int, batches: list | None, normalize: nn.Module, seed: int,
               arch: str, adv: dict | None = None) -> tuple[nn.Module, int]:
    """Prune ``net`` in place by ``ratio`` in ``steps`` steps; returns it and its MACs.

    Errors name the layer torch-pruning fails at."""
    import torch_pruning as tp

    dev = next(net.parameters()).device
    example = torch.zeros(1, *shape, device=dev)
    modules = dict(net.named_modules())
    net.eval()
    torch.manual_seed(seed)
    with _Tracker(net) as tr:
        try:
            pruner = tp.pruner.BasePruner(
                net, example, importance=_importance(method), global_pruning=scope == "global",
                pruning_ratio=ratio, iterative_steps=steps, ignored_layers=[modules[n] for n in ignored],
                round_to=round_to,
            )
        except Exception as exc:  # noqa: BLE001
            raise RcompError(_blocker(net, arch) or (
                f"torch-pruning cannot trace {arch} (failed at layer {tr.last!r}: {_first_line(exc)}); "
                "this architecture cannot be pruned structurally")) from None
    for k in range(steps):
        _rescore(method, net, pruner.importance, normalize=normalize, batches=batches, adv=adv,
                 keep=(1 - ratio * (k + 1) / steps) / (1 - ratio * k / steps), ignored=ignored, seed=seed)
        try:
            pruner.step()
        except Exception as exc:  # noqa: BLE001
            raise RcompError(f"torch-pruning failed on {arch}: {_first_line(exc)}; try --ignore on the layers "
                             "it names, or another --method") from None
    if IMPORTANCES.get(method).get("needs_data"):
        net.zero_grad(set_to_none=True)
    from rcomp.evaluation.cost import count_macs

    with _Tracker(net) as tr:
        try:
            macs = count_macs(net, shape)  # also checks that the pruned network still runs
        except Exception as exc:  # noqa: BLE001
            raise RcompError(f"torch-pruning cannot handle layer {tr.last!r} of {arch} (the pruned network fails "
                             f"there: {_first_line(exc)}); keep the layers feeding it with --ignore NAME") from None
    return net, macs


#: operations torch-pruning 1.6.1 cannot follow channels through: module -> (operation, why no --ignore helps)
_BLOCKERS = {
    "torchvision.models.shufflenetv2": (
        "channel_shuffle (torchvision's view to 5-D, transpose, view back after every block's concatenation)",
        "its dependency graph cannot map channels through that permutation (Torch-Pruning issues #14, #45) and "
        "fails while the graph is built, before --ignore applies, so no --ignore works around it"),
}


def _blocker(net: nn.Module, arch: str) -> str | None:
    """A one-line explanation when ``net`` contains an operation torch-pruning is known to fail on."""
    for mod in net.modules():
        hit = _BLOCKERS.get(type(mod).__module__)
        if hit:
            return (f"torch-pruning 1.6.1 cannot prune {arch}: it contains {hit[0]}, and {hit[1]}; quantize it "
                    "instead (rcomp quantize) or prune another architecture such as mobilenet_v2")
    return None


def check_prunable(net: nn.Module, arch: str) -> None:
    """Refuse, before any work, networks this pruner is known to break: see :func:`_attention_blocker`."""
    blocked = _attention_blocker(net, arch)
    if blocked:
        raise RcompError(blocked)


def _attention_blocker(net: nn.Module, arch: str) -> str | None:
    """A one-line refusal for networks with multi-head self-attention blocks (timm ViTs and the like):
    torch-pruning 1.6.1 prunes their channels without keeping whole heads, and the attention's reshape
    of qkv into heads x head_dim then fails (or silently computes something else)."""
    for name, mod in net.named_modules():
        if isinstance(getattr(mod, "num_heads", None), int) and not isinstance(mod, nn.MultiheadAttention):
            return (f"rcomp cannot prune {arch} structurally: its attention layer {name!r} ({type(mod).__name__}) "
                    f"splits channels into {mod.num_heads} heads, and channel pruning without handling the heads "
                    "breaks its qkv reshape; quantize it instead (rcomp quantize) or prune a convolutional model")
    return None


def _validate(ratio, method, scope, round_to, iterative, target_macs, target_params, batches, net, arch):
    given = [v for v in (ratio, target_macs, target_params) if v is not None]
    if len(given) != 1:
        raise RcompError("give exactly one of --ratio, --target-macs or --target-params, e.g. --ratio 0.5")
    for what, v in (("--ratio", ratio), ("--target-macs", target_macs), ("--target-params", target_params)):
        if v is not None and not (isinstance(v, (int, float)) and 0 < v < 1):
            raise RcompError(f"{what} {v!r} must lie strictly between 0 and 1, e.g. 0.5")
    entry = IMPORTANCES.get(method)
    if scope not in SCOPES:
        raise RcompError(f"--scope {scope!r} is not one of {', '.join(SCOPES)}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise RcompError(f"--round-to must be a positive integer, got {round_to!r}")
    if not isinstance(iterative, int) or iterative < 1:
        raise RcompError(f"--iterative must be a positive integer number of steps, got {iterative!r}")
    if entry.get("needs_data") and not batches:
        raise RcompError(f"--method {method} needs gradients from data: add --data NAME (e.g. --data digits)")
    if entry.get("needs_batchnorm") and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise RcompError(f"--method {method} needs BatchNorm layers and {arch} has none; use --method l1")


def _adversarial(method: str, eps, attack_steps, score_steps) -> dict | None:
    """The adversarial scoring settings, checked: ``None`` when the criterion is not adversarial."""
    entry = IMPORTANCES.get(method)
    if entry.get("adversarial") == "required" and eps is None:
        raise RcompError(f"--method {method} learns scores against adversarial examples: add --adv-eps E (e.g. 0.1)")
    if eps is None:
        return None
    if not entry.get("adversarial"):
        takers = " or ".join(e.name for e in IMPORTANCES.entries(plugins=False) if e.get("adversarial"))
        raise RcompError(f"--adv-eps applies to --method {takers}, not {method}; drop it or change --method")
    if not (isinstance(eps, (int, float)) and 0 < eps <= 1):
        raise RcompError(f"--adv-eps {eps!r} must lie in (0, 1] (pixel units), e.g. 0.1 or 8/255")
    for what, v, hi in (("--adv-steps", attack_steps, 1000), ("--score-steps", score_steps, 10000)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise RcompError(f"{what} must be an integer from 1 to {hi}, got {v!r}")
    adv = {"attack": "pgd", "eps": float(eps), "attack_steps": attack_steps}
    if "score_steps" in entry.takes:
        adv["score_steps"] = score_steps
    return adv


def prune(model, ratio: float | None = None, *, method: str = "l1", scope: str = "local",
          round_to: int | None = None, ignore=(), iterative: int = 1, target_macs: float | None = None,
          target_params: float | None = None, batches=None, seed: int = 0, log=None,
          adv_eps: float | None = None, adv_steps: int = 5, score_steps: int = 100):
    """Prune ``model`` (a :class:`~rcomp.models.wrapper.Classifier`); returns ``(model, report)``.

    ``model.net`` is replaced by a pruned copy (the input network is left untouched if anything
    fails). Give exactly one of ``ratio`` (fraction of channels removed, in (0, 1)),
    ``target_macs`` or ``target_params`` (fraction of MACs / parameters to keep; the ratio is found
    by bisection). ``ignore``: module paths inside ``model.net`` never pruned. ``iterative``: reach
    the ratio in that many equal steps (importance re-scored after each). ``round_to``: channel
    counts a multiple of N. ``batches``: list of ``(images, labels)`` for ``method="taylor"`` and
    ``"hydra"``. ``adv_eps`` (pixels): score channels on PGD-``adv_steps`` adversarial examples
    (``taylor``; required by ``hydra``, which optimises its scores for ``score_steps`` steps).
    ``model.meta.compression["pruning"]`` gets a summary (merged with an earlier pruning).
    """
    from rcomp.evaluation.cost import count_macs, count_params

    arch = model.meta.arch.name
    if model.is_quantized:
        raise RcompError("the model is quantized; prune the float checkpoint first, then quantize")
    net = model.net
    check_prunable(net, arch)
    batches = list(batches) if batches is not None else None
    _validate(ratio, method, scope, round_to, iterative, target_macs, target_params, batches, net, arch)
    adv = _adversarial(method, adv_eps, adv_steps, score_steps)
    say = log or (lambda msg: None)
    shape = tuple(model.meta.input.shape)
    dev = next(net.parameters()).device
    was_training = net.training
    net.eval()
    classifier = find_classifier(net, torch.zeros(1, *shape, device=dev))
    ignored = resolve_ignore(net, ignore)
    ignored_all = sorted(set(ignored) | {classifier})
    params_before, macs_before = count_params(net), count_macs(net, shape)
    channels_before = prunable_channels(net, classifier)
    common = dict(shape=shape, method=method, scope=scope, round_to=round_to, ignored=ignored_all,
                  steps=iterative, batches=batches, normalize=model.normalize, seed=seed, arch=arch, adv=adv)
    t0 = time.perf_counter()
    target = None
    if ratio is not None:
        pruned, macs_after = _prune_net(copy.deepcopy(net), ratio, **common)
    else:
        key, frac = ("macs", target_macs) if target_macs is not None else ("params", target_params)
        target = {key: frac}
        before = macs_before if key == "macs" else params_before

        def kept(result):
            return (result[1] if key == "macs" else count_params(result[0])) / before

        ratio, (pruned, macs_after) = _search(lambda r: _prune_net(copy.deepcopy(net), r, **common), kept, frac, key, say)
    seconds = time.perf_counter() - t0
    pruned.train(was_training)
    model.net = pruned
    report = PruneReport(
        method=method, scope=scope, ratio_requested=round(float(ratio), 6),
        ratio_reached=round(1 - prunable_channels(pruned, classifier) / max(channels_before, 1), 6),
        params_before=params_before, params_after=count_params(pruned), macs_before=macs_before,
        macs_after=macs_after, channels_before=channels_before,
        channels_after=prunable_channels(pruned, classifier), iterative=iterative, round_to=round_to,
        ignored=ignored, classifier=classifier, target=target, seconds=round(seconds, 3), adversarial=adv,
    )
    _record(model, report)
    return model, report


def _search(trial, kept, frac: float, key: str, say, tol: float = 0.005) -> tuple[float, tuple[nn.Module, int]]:
    """A ratio whose pruned network keeps ``frac`` (within ``tol``) of the MACs or parameters.

    Guesses with the model ``kept = (1 - ratio) ** a`` (a = 2 for a chain of convolutions), refitted
    after each trial and stepping 1.5x past the guess until the target is bracketed; then bisects.
    At most 16 trials; if none lands within ``tol``, the closest one keeping less than ``frac`` wins.
    """
    import math

    lo, hi = 0.0, None  # kept(lo) > frac >= kept(hi)
    best, best_r, seen, flat = None, None, set(), 0
    guess = 1 - math.sqrt(frac)
    for _ in range(16):
        result = trial(guess)
        k = kept(result)
        say(f"  ratio {guess:.4f} keeps {k:.4f} of the {key}")
        if abs(k - frac) <= tol:
            return guess, result
        flat = flat + 1 if round(k, 9) in seen else 0  # channel rounding makes kept() a staircase
        seen.add(round(k, 9))
        if k < frac:
            hi, best, best_r = guess, result, guess
        else:
            lo = guess
        if hi is not None:
            if hi - lo < 1e-3 or flat >= 2:
                break
            guess = (lo + hi) / 2
            continue
        if guess >= MAX_SEARCH_RATIO:
            raise RcompError(f"--target-{key} {frac:g} cannot be reached: removing {guess:.0%} of the channels still "
                             f"keeps {k:.3f} of the {key}; ask for a larger fraction")
        a = max(math.log(k) / math.log(1 - guess), 0.5) if 0 < k < 1 else 2.0
        step = (1 - frac ** (1 / a)) - guess
        guess = min(guess + max(1.5 * step, 0.002), MAX_SEARCH_RATIO)
    if best is None:
        raise RcompError(f"--target-{key} {frac:g} was not reached by the ratio search; give --ratio instead")
    return best_r, best


def _record(model, report: PruneReport) -> None:
    """Write or merge ``compression["pruning"]``: totals since the dense model, plus this round's settings."""
    comp = model.meta.compression
    prev = comp.get("pruning") if isinstance(comp.get("pruning"), dict) else None
    first = prev if prev and all(isinstance(prev.get(k), int) for k in ("params_before", "macs_before",
                                                                          "channels_before")) else None
    channels_dense = first["channels_before"] if first else report.channels_before
    summary = {
        "method": report.method if not prev or prev.get("method") == report.method else
        f"{prev.get('method')}+{report.method}",
        "scope": report.scope,
        "ratio_requested": report.ratio_requested,
        "ratio_reached": round(1 - report.channels_after / max(channels_dense, 1), 6),
        "round_to": report.round_to,
        "iterative": report.iterative,
        "params_before": first["params_before"] if first else report.params_before,
        "params_after": report.params_after,
        "macs_before": first["macs_before"] if first else report.macs_before,
        "macs_after": report.macs_after,
        "channels_before": channels_dense,
        "channels_after": report.channels_after,
        "times": (int(prev.get("times", 1)) if prev else 0) + 1,
    }
    if report.ignored:
        summary["ignored"] = report.ignored
    if report.target:
        summary["target"] = report.target
    if report.adversarial:
        summary["adversarial"] = report.adversarial
    comp["pruning"] = summary
