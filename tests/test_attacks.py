"""Attacks: the guarantees as property tests, the linear closed forms, and bad construction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rcomp.attacks import ATTACKS, make_attack
from rcomp.attacks.base import flat_norm
from rcomp.errors import RcompError

#: the single attacks (the suite auto is tested in test_attacks_auto.py)
SINGLE = [e.name for e in ATTACKS.entries(plugins=False) if not e.get("suite")]
FAST = {"fgsm": {}, "pgd": {"steps": 3}, "apgd": {"steps": 5}, "cw": {"steps": 3}, "apgd-t": {"steps": 3, "targets": 2},
        "square": {"queries": 10}}


class Tiny(nn.Module):
    """Conv + BatchNorm + Dropout: train mode would change outputs and BN statistics."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():  # non-trivial running statistics
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SINGLE)), norm=st.sampled_from(["linf", "l2"]),
       eps=st.floats(0.0, 0.6), batch=st.integers(1, 5), seed=st.integers(0, 2**31), train=st.booleans(),
       targeted=st.booleans(), loss=st.sampled_from(["ce", "dlr", None]))
def test_attack_guarantees(name, norm, eps, batch, seed, train, targeted, loss):
    model = _tiny()
    model.train(train)
    before = _state(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 4, 4, generator=g)
    x[0, 0, 0, 0] = 0.0  # pixels on the box edges
    x[-1, 0, -1, -1] = 1.0
    y = torch.randint(0, 5, (batch,), generator=g)
    kw = dict(FAST[name], loss=None if name == "cw" else loss)
    atk = make_attack(name, eps, norm=norm, seed=seed, targeted=targeted, **kw)
    x_adv = atk(model, x, y)

    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float(flat_norm(x_adv - x, norm).max()) <= eps + 1e-5
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # parameters and buffers untouched (BN running stats would move in train mode), no .grad anywhere
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    # previous mode restored on every module
    assert all(m.training == train for m in model.modules())
    # the same seed reproduces the examples
    again = make_attack(name, eps, norm=norm, seed=seed, targeted=targeted, **kw)(model, x, y)
    assert torch.equal(x_adv, again)


def test_attack_runs_in_eval_mode():
    """Dropout at p=0.5 in train mode would make two identical calls differ; eval mode does not."""
    model = _tiny()
    model.train()
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 5, (8,))
    seen = []
    hook = model.drop.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    make_attack("pgd", 0.1, steps=2, seed=0)(model, x, y)
    hook.remove()
    assert seen and not any(seen)
    assert model.training


class _NoGradNet(nn.Module):
    """Stands for an int8 model: no autograd, but a differentiable twin for attacks."""

    def __init__(self):
        super().__init__()
        self.twin = _tiny()
        self.twin_calls = 0
        self.twin.register_forward_pre_hook(lambda m, inp: setattr(self, "twin_calls", self.twin_calls + 1))

    def forward(self, x):
        with torch.no_grad():
            return self.twin(x)

    def gradient_model(self):
        return self.twin


@pytest.mark.parametrize("name", sorted(n for n in SINGLE if getattr(ATTACKS.load(n), "uses_gradients", True)))
def test_gradients_come_from_gradient_model(name):
    model = _NoGradNet().eval()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
    x_adv = make_attack(name, 0.1, seed=0, **FAST[name])(model, x, y)
    assert model.twin_calls > 0
    assert float((x_adv - x).abs().max()) > 0  # real gradient steps were taken


def test_attack_under_no_grad_and_inference_mode():
    model = _tiny().eval()
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    ref = make_attack("pgd", 0.1, steps=3, seed=1)(model, x, y)
    with torch.no_grad():
        a = make_attack("pgd", 0.1, steps=3, seed=1)(model, x, y)
    with torch.inference_mode():
        xi = x.clone()
    b = make_attack("pgd", 0.1, steps=3, seed=1)(model, xi, y)
    assert torch.equal(ref, a) and torch.equal(ref, b)


def test_images_outside_unit_range_refused():
    with pytest.raises(RcompError, match=r"\[0, 1\]"):
        make_attack("fgsm", 0.1)(_tiny().eval(), torch.full((1, 1, 4, 4), 2.0), torch.tensor([0]))


# ---------------------------------------------------------------------------
# the analytic case: a two-class linear model
# ---------------------------------------------------------------------------

def _linear_case(seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    x = torch.rand(64, 1, 4, 4) * 0.4 + 0.3  # interior: eps = 0.1 never meets the [0, 1] box
    y = torch.randint(0, 2, (64,))
    w = lin[1].weight.detach()
    sign = torch.where(y == 1, 1.0, -1.0)[:, None]  # margin = sign * (w1 - w0) . x + ...
    d = (w[1] - w[0])

    def margin(xa):
        with torch.no_grad():
            z = lin(xa)
        return z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)

    return lin, x, y, d, sign, margin


@pytest.mark.parametrize("name,norm,kw,tol", [
    ("fgsm", "linf", {}, 1e-5),
    ("pgd", "linf", {}, 1e-5),
    ("pgd", "linf", {"restarts": 2}, 1e-5),
    ("apgd", "linf", {"steps": 10}, 1e-5),
    ("cw", "linf", {}, 1e-5),
    ("fgsm", "l2", {}, 1e-5),
    ("pgd", "l2", {"random_start": False}, 1e-5),
    ("pgd", "l2", {"steps": 30}, 2e-2),  # from a random start the l2 iterates approach the optimum
    ("apgd", "l2", {"steps": 10}, 1e-4),
])
def test_linear_closed_form(name, norm, kw, tol):
    """For logits W x + b with two classes, the smallest margin over the eps ball is
    margin(x) - eps * ||w_1 - w_0||_1 (linf) or - eps * ||w_1 - w_0||_2 (l2), reached at
    x + eps * sign(...) or x + eps * (...)/||...||_2. Points that cannot be fooled must reach it
    exactly; the others must be fooled (attacks stop at the first fooling iterate)."""
    lin, x, y, d, sign, margin = _linear_case()
    eps = 0.1
    best = margin(x) - eps * (d.abs().sum() if norm == "linf" else d.norm())
    x_adv = make_attack(name, eps, norm=norm, seed=0, **kw)(lin, x, y)
    got = margin(x_adv)
    fool = best < 0
    assert 0 < int(fool.sum()) < len(y)  # both kinds of point are present
    assert bool((got[fool] < 0).all())
    err = (got[~fool] - best[~fool]).abs() / (1 + best[~fool].abs())
    assert float(err.max()) <= tol
    # and nothing does better than the optimum
    assert bool((got >= best - 1e-4).all())


# ---------------------------------------------------------------------------
# registry and bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,needle", [
    ({"name": "pgdd", "eps": 0.1}, "unknown attack"),
    ({"name": "pgd", "eps": 0.1, "norm": "l1"}, "unknown norm"),
    ({"name": "pgd", "eps": 0.1, "steps": 0}, "--steps"),
    ({"name": "pgd", "eps": -0.1}, "outside [0, 1]"),
    ({"name": "pgd", "eps": 1.5}, "outside [0, 1]"),
    ({"name": "pgd", "eps": 0.1, "restarts": 0}, "--restarts"),
    ({"name": "pgd", "eps": 0.1, "loss": "mse"}, "unknown loss"),
    ({"name": "fgsm", "eps": 0.1, "steps": 5}, "single step"),
    ({"name": "apgd", "eps": 0.1, "alpha": 0.01}, "--alpha"),
    ({"name": "cw", "eps": 0.1, "loss": "ce"}, "margin"),
])
def test_make_attack_refuses(kw, needle):
    with pytest.raises(RcompError) as info:
        make_attack(**kw)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_defaults_and_params():
    pgd = make_attack("pgd", 8 / 255, seed=3)
    p = pgd.params()
    assert p["steps"] == 10 and p["random_start"] is True and p["restarts"] == 1
    assert p["alpha"] == pytest.approx(2.5 * (8 / 255) / 10)
    assert make_attack("apgd", 0.1).params()["steps"] == 100
    assert make_attack("cw", 0.1).params()["loss"] == "cw"
    assert make_attack("fgsm", 0.1).params()["random_start"] is False
    import json

    json.dumps([make_attack(n, 0.1).params() for n in SINGLE])


def test_dlr_needs_three_classes():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    with pytest.raises(RcompError, match="dlr"):
        make_attack("apgd", 0.1, loss="dlr", steps=2)(lin, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


def test_targeted_reaches_targets():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.rand(32, 1, 4, 4)
    y = lin(x).argmax(1).detach()
    target = (y + 1) % 4
    x_adv = make_attack("pgd", 1.0, steps=20, targeted=True, seed=0)(lin, x, y, target=target)
    hit = (lin(x_adv).argmax(1) == target).float().mean()
    assert float(hit) > 0.9
