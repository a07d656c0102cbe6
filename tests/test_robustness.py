"""evaluate(): semantics of robust and worst-case accuracy, and attacks on a trained digits model."""

from __future__ import annotations

import io

import pytest
import torch

from rcomp.attacks import make_attack
from rcomp.evaluation.robustness import evaluate
from rcomp.progress import Progress


@pytest.fixture(scope="module")
def digits_loader(digits_model):
    from rcomp.data.registry import get_dataset, make_loader

    ds = get_dataset("digits", "test", digits_model.meta.input)
    return make_loader(ds, 64, n=192)


class _Fixed:
    """A deterministic 'attack' (a function of the images), to check the bookkeeping by hand."""

    norm = "linf"

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, model, x, y):
        self.calls.append(len(y))
        return self.fn(x)

    def params(self):
        return {"attack": "fixed"}


def test_worst_case_bookkeeping(digits_model, digits_loader):
    """robust = correct clean AND correct under the attack; worst = correct clean AND under every attack;
    only the points correct clean are attacked."""
    a = _Fixed(lambda x: (x + 0.25).clamp(0, 1))
    b = _Fixed(lambda x: x.flip(-1))
    res = evaluate(digits_model, digits_loader, {"a": a, "b": b}, progress=False)
    ok = ra = rb = both = 0
    n = 0
    with torch.no_grad():
        for x, y in digits_loader:
            c = digits_model(x).argmax(1) == y
            ca = c & (digits_model(a.fn(x)).argmax(1) == y)
            cb = c & (digits_model(b.fn(x)).argmax(1) == y)
            ok, ra, rb, both, n = ok + int(c.sum()), ra + int(ca.sum()), rb + int(cb.sum()), both + int((ca & cb).sum()), n + len(y)
    assert res.n == n == 192
    assert res.clean_acc == pytest.approx(ok / n)
    assert res.robust_acc == pytest.approx({"a": ra / n, "b": rb / n})
    assert res.worst_case_acc == pytest.approx(both / n)
    assert sum(a.calls) == sum(b.calls) == ok == res.attacks["a"].attacked
    assert res.attacks["a"].success_rate == pytest.approx((ok - ra) / ok)
    assert 0 < res.worst_case_acc < min(res.robust_acc.values())  # the two attacks fool different points


def test_pgd_hurts_noise_does_not(digits_model, digits_loader):
    eps = 0.1
    g = torch.Generator().manual_seed(0)

    def noise(model, x, y):  # random corners of the same linf ball
        s = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
        return (x + eps * s).clamp(0, 1)

    noise.norm = "linf"
    pgd = make_attack("pgd", eps, seed=0)
    res = evaluate(digits_model, digits_loader, {"noise": noise, "pgd": pgd}, progress=False)
    assert res.clean_acc > 0.9
    assert res.robust_acc["noise"] >= res.clean_acc - 0.05
    assert res.robust_acc["pgd"] <= res.clean_acc - 0.2
    assert res.attacks["pgd"].max_norm <= eps + 1e-5
    assert res.attacks["pgd"].mean_norm > 0.5 * eps


def test_stronger_never_weaker(digits_model, digits_loader):
    """Same points, same seed: more restarts, or more steps at the same step size, never raise robust accuracy."""
    eps = 0.05
    atk = {
        "pgd3": make_attack("pgd", eps, steps=3, alpha=0.02, seed=0),
        "pgd10": make_attack("pgd", eps, steps=10, alpha=0.02, seed=0),
        "pgd3x3": make_attack("pgd", eps, steps=3, alpha=0.02, restarts=3, seed=0),
        "fgsm": make_attack("fgsm", eps, seed=0),
        "apgd": make_attack("apgd", eps, steps=10, seed=0),
    }
    r = evaluate(digits_model, digits_loader, atk, progress=False).robust_acc
    assert r["pgd10"] <= r["pgd3"]
    assert r["pgd3x3"] <= r["pgd3"]
    assert r["pgd10"] < r["fgsm"]  # and the iterative attack is clearly stronger than one step here
    assert r["apgd"] <= r["fgsm"]


def test_seed_reproduces_and_mode_is_restored(digits_model, digits_loader):
    digits_model.train()
    try:
        r1 = evaluate(digits_model, digits_loader, {"pgd": make_attack("pgd", 0.05, steps=3, seed=7)}, progress=False)
        assert digits_model.training
        r2 = evaluate(digits_model, digits_loader, {"pgd": make_attack("pgd", 0.05, steps=3, seed=7)}, progress=False)
    finally:
        digits_model.eval()
    assert r1.robust_acc == r2.robust_acc and r1.attacks["pgd"].mean_norm == r2.attacks["pgd"].mean_norm


def test_progress_writes_only_to_its_stream(capsys):
    class TTY(io.StringIO):
        def isatty(self):
            return True

    plain, tty = io.StringIO(), TTY()
    with Progress(10, "x", stream=plain) as p:
        p.update(4, acc=0.5)
        p.update(6)
    with Progress(10, "y", stream=tty, min_interval=0) as p:
        p.update(5)
        p.update(5)
    with pytest.raises(KeyError), Progress(3, "z", stream=plain) as p:
        raise KeyError("boom")
    assert plain.getvalue().count("\n") == 1 and "10/10" in plain.getvalue() and "acc=0.500" in plain.getvalue()
    assert "\r" in tty.getvalue() and tty.getvalue().endswith("\n")
    assert capsys.readouterr().out == ""


def test_surrogate_gradient_is_used_and_reported(digits_model, digits_loader):
    """An int8-style model: predictions from the model, gradients from its attached twin."""
    import copy

    twin = copy.deepcopy(digits_model)
    twin.description = "fake-quant twin (test)"
    calls = []
    hook = twin.register_forward_pre_hook(lambda m, inp: calls.append(1))
    digits_model.set_gradient_model(twin)
    try:
        res = evaluate(digits_model, digits_loader, {"fgsm": make_attack("fgsm", 0.1)}, progress=False)
    finally:
        digits_model.set_gradient_model(None)
        hook.remove()
    assert res.gradient_source == "fake-quant twin (test)" and calls
    assert res.robust_acc["fgsm"] < res.clean_acc
