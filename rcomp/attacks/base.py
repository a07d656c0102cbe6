"""What every attack shares: the threat model (eps ball in pixel space), losses, projection,
random starts, and the contract of ``attack(model, x, y) -> x_adv``.

The contract, for every attack in :mod:`rcomp.attacks`:

* ``x`` holds images in [0, 1] (N, C, H, W); ``x_adv`` has the same shape, is detached, lies
  within ``eps`` of ``x`` in the attack's norm (``linf`` or ``l2``, pixel units) and in [0, 1];
* gradients come from ``model.gradient_model()`` when the model has that method (an int8 model
  attaches a differentiable fake-quant twin), else from ``model``; they are taken with
  ``torch.autograd.grad`` with respect to the input only, so no ``.grad`` accumulates on any
  parameter and no parameter changes;
* every module is switched to eval mode while attacking and put back in its previous mode
  afterwards (adversarial training calls attacks on a model in train mode);
* the random parts (random start, random targets) come from a generator seeded with ``seed``:
  the same attack object built with the same seed gives the same examples. A caller that owns a
  random stream (adversarial training draws augmentation and attack starts from one generator per
  step) passes it as ``generator=`` and every random draw of that call comes from it instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rcomp.attacks.catalog import LOSSES, NORMS
from rcomp.errors import RcompError
from rcomp.seeding import stream_seed

_TINY = 1e-12


# ---------------------------------------------------------------------------
# losses: per-example, to be MAXIMISED by the attacker
# ---------------------------------------------------------------------------

def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per example (positive when ``y`` wins)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf"))
    return z_y - other.max(1).values


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce and Hein 2020, eq. 4), untargeted, to maximise.

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, with ``z_pi`` the logits sorted in
    decreasing order; invariant to shifting and scaling the logits. Needs >= 3 classes.
    """
    srt = logits.sort(dim=1, descending=True).values
    return -margin(logits, y) / (srt[:, 0] - srt[:, 2] + _TINY)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce and Hein 2020): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``. Needs >= 4 classes."""
    srt = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + _TINY)


def attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per-example loss the attacker maximises: ``ce``, ``dlr`` or ``cw`` (margin), untargeted or targeted."""
    if target is None:
        if name == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        if name == "cw":
            return -margin(logits, y)
        return dlr_loss(logits, y)
    if name == "ce":
        return -F.cross_entropy(logits, target, reduction="none")
    if name == "cw":
        return margin(logits, target)
    return dlr_loss_targeted(logits, y, target)


def kl_loss(logits: torch.Tensor, p_ref: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || softmax(logits))`` per example: TRADES' robustness term (Zhang et al., ICML 2019)."""
    return F.kl_div(F.log_softmax(logits, dim=1), p_ref, reduction="none").sum(1)


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------

def flat_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm of ``t`` (N, ...) -> (N,)."""
    f = t.flatten(1)
    return f.abs().amax(1) if norm == "linf" else f.norm(p=2, dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the eps ball around ``x`` in ``norm``, then clip to [0, 1].

    Clipping after projecting never leaves the ball: ``x`` is in [0, 1], so clipping moves every
    coordinate towards ``x``.
    """
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        n = flat_norm(delta, "l2")
        factor = torch.clamp(eps / (n + _TINY), max=1.0)
        x_adv = x + delta * _bcast(factor, delta)
    return x_adv.clamp(0.0, 1.0)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent direction of unit ``norm``: sign(g) for linf, g / ||g||_2 for l2."""
    if norm == "linf":
        return grad.sign()
    n = flat_norm(grad, "l2")
    return grad / _bcast(n + _TINY, grad)


# ---------------------------------------------------------------------------
# the base class
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for every submodule inside the block; each module's own previous mode restored after."""
    saved: list[tuple[nn.Module, bool]] = []
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                saved.append((m, m.training))
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


class Attack:
    """An evasion attack within an eps ball; subclasses implement :meth:`perturb`.

    Parameters (shared by all attacks): ``eps`` budget in pixel units of [0, 1] images;
    ``norm`` ``linf`` or ``l2``; ``loss`` the per-example loss maximised (``ce`` cross-entropy,
    ``dlr`` difference of logits ratio, ``cw`` Carlini-Wagner margin); ``targeted``: push each
    image towards a target class (given as ``target=`` on call, else drawn at random among the
    other classes with the attack's generator) instead of away from its label; ``seed`` for the
    random parts (None draws one from torch's global generator, so ``torch.manual_seed`` still
    makes runs reproducible).
    """

    name: ClassVar[str] = "attack"
    paper: ClassVar[str] = ""

    def __init__(self, eps: float, norm: str = "linf", *, loss: str = "ce", targeted: bool = False,
                 seed: int | None = None):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 <= eps <= 1:
            raise RcompError(f"eps {eps!r} is outside [0, 1]; eps is in pixel units of [0, 1] images (e.g. 8/255)")
        if norm not in NORMS:
            raise RcompError(f"unknown norm {norm!r} for {self.name}; choose one of {', '.join(NORMS)}")
        if loss not in LOSSES:
            raise RcompError(f"unknown loss {loss!r} for {self.name}; choose one of {', '.join(LOSSES)}")
        self.eps = float(eps)
        self.norm = norm
        self.loss = loss
        self.targeted = bool(targeted)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self._gens: dict[str, torch.Generator] = {}
        self._calls = 0  # counts calls: each call draws its own random streams
        self._override: torch.Generator | None = None
        self.gradient_source = "exact"

    # ----- public API --------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 target: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Adversarial examples for images ``x`` in [0, 1] with labels ``y`` (see the module docstring).

        ``generator``: draw this call's random numbers from it (in order) instead of the attack's
        own seeded streams.
        """
        self._override = generator
        try:
            return self._attack(model, x, y, target)
        finally:
            self._override = None

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] != y.shape[0]:
            raise RcompError(f"{self.name}: images {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
        grad_model = model.gradient_model() if hasattr(model, "gradient_model") else model
        #: the model's own account of its gradients ("exact" unless it says otherwise)
        self.gradient_source = str(getattr(model, "gradient_source", "exact"))
        with torch.inference_mode(False), torch.enable_grad():
            x0 = x.detach().clone().float()
            y = y.detach().clone().long()
            if x0.numel() and (x0.min() < -1e-6 or x0.max() > 1 + 1e-6):
                raise RcompError(f"{self.name}: images must be in [0, 1] (normalisation belongs inside the model)")
            x0 = x0.clamp(0.0, 1.0)
            if x0.shape[0] == 0 or self.eps == 0:
                return x0
            self._calls += 1
            # eval mode, and a fake-quant network's weights rounded once for the whole attack, not on every
            # step (bit-identical, rcomp.quant.frozen; also inside training, where the weights move only between
            # attacks)
            from rcomp.quant.frozen import frozen_quantizers

            with eval_mode(model, grad_model), frozen_quantizers(model, grad_model):
                if self.targeted:
                    target = self._targets(grad_model, x0, y) if target is None else target.detach().clone().long()
                else:
                    target = None
                x_adv = self.perturb(grad_model, x0, y, target)
            return project(x0, x_adv.detach(), self.radius(), self.norm).detach()

    def reset(self) -> None:
        """Rewind the random streams: the next calls draw what the first calls drew."""
        self._calls = 0

    def skip_call(self, n: int) -> None:
        """Move the random streams on as a call on ``n`` images would, without attacking: a sharded
        evaluation's process passing over a batch another process attacks (its next call then draws
        what it would have drawn in one process)."""
        if n and self.eps != 0:  # as _attack: an empty batch or eps 0 is no call
            self._calls += 1

    def params(self) -> dict[str, Any]:
        """The full parameters, JSON-able: enough to rebuild the attack with :func:`rcomp.attacks.make_attack`."""
        return {"attack": self.name, "eps": self.eps, "norm": self.norm, "loss": self.loss,
                "targeted": self.targeted, "seed": self.seed, **self._extra_params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "attack")
        return f"{type(self).__name__}({args})"

    # ----- for subclasses ----------------------------------------------
    def radius(self) -> float:
        """The ball every result is projected onto: ``eps`` for every evaluation attack. Only a training
        adversary that deliberately leaves the eps ball (:class:`~rcomp.attacks.fgsm.NFGSM`) widens it."""
        return self.eps

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_params(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def iterations(steps: int | None, default: int, restarts: int) -> tuple[int, int]:
        """``(steps, restarts)`` with the default filled in; both at least 1 (the one place this is checked
        for attacks built in Python; the command line refuses such values when it parses them)."""
        n = default if steps is None else int(steps)
        if n < 1 or isinstance(steps, bool):
            raise RcompError(f"--steps must be at least 1, got {steps}")
        if int(restarts) < 1:
            raise RcompError(f"--restarts must be at least 1, got {restarts}")
        return n, int(restarts)

    def generator(self, device: torch.device, stream: int = 0) -> torch.Generator:
        """A generator for random stream ``stream`` of the current call, on ``device``.

        Each (call, stream) pair gets its own seed derived from ``seed``, so what restart ``r`` of
        batch ``b`` draws does not depend on how many restarts earlier batches used: a run with
        more restarts repeats the runs with fewer, then adds to them. During a call given
        ``generator=``, that generator instead (:meth:`random_start` and random targets draw on its
        device and move the numbers to the images' device; other draws need it on ``device``).
        """
        if getattr(self, "_override", None) is not None:
            return self._override
        key = str(device)
        g = self._gens.get(key)
        if g is None:
            g = self._gens[key] = torch.Generator(device=device)
        g.manual_seed(stream_seed(self.seed, self._calls, stream))
        return g

    def random_start(self, x: torch.Tensor, restart: int = 0) -> torch.Tensor:
        """A uniform point of the linf ball, or a point of the l2 ball (Gaussian direction, radius eps * U)."""
        g = self.generator(x.device, stream=restart + 1)
        if self.norm == "linf":
            delta = (torch.rand(x.shape, generator=g, device=g.device).to(x.device) * 2 - 1) * self.eps
        else:
            d = torch.randn(x.shape, generator=g, device=g.device).to(x.device)
            d = d / _bcast(flat_norm(d, "l2") + _TINY, d)
            r = torch.rand(x.shape[0], generator=g, device=g.device).to(x.device) * self.eps
            delta = d * _bcast(r, d)
        return (x + delta).clamp(0.0, 1.0)

    def loss_and_grad(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
                      target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example loss, its gradient w.r.t. the input only, and the logits (all detached)."""
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        loss = self.objective(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), [x_adv])
        return loss.detach(), grad.detach(), logits.detach()

    def objective(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """The per-example loss maximised: :func:`attack_loss` ``self.loss`` (subclasses may change it)."""
        self.check_classes(logits)
        return attack_loss(self.loss, logits, y, target)

    def succeeded(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """Boolean per example: misclassified (untargeted) or classified as the target (targeted)."""
        pred = logits.argmax(1)
        return pred == target if target is not None else pred != y

    def _targets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        if num_classes < 2:
            raise RcompError(f"{self.name}: a targeted attack needs at least 2 classes")
        g = self.generator(x.device, stream=0)
        shift = torch.randint(1, num_classes, y.shape, generator=g, device=g.device).to(x.device)
        return (y + shift) % num_classes

    def check_classes(self, logits: torch.Tensor) -> None:
        need = {"dlr": 4 if self.targeted else 3}.get(self.loss, 2)
        if logits.shape[1] < need:
            raise RcompError(f"{self.name}: the dlr loss needs at least {need} classes, the model has "
                             f"{logits.shape[1]}; use --loss ce")
