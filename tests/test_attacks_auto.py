"""APGD-T, Square, the `auto` cascade and the gradient-masking check (issue 14)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rcomp.attacks import make_attack
from rcomp.attacks.base import flat_norm
from rcomp.errors import RcompError
from rcomp.evaluation.robustness import evaluate

FAST = {"apgd-t": {"steps": 4, "targets": 3}, "square": {"queries": 25}}


def _tiny(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, classes)).eval()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(FAST)), norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.0, 0.6),
       batch=st.integers(1, 5), seed=st.integers(0, 2**40))
def test_guarantees_and_per_point_determinism(name, norm, eps, batch, seed):
    model = _tiny()
    g = torch.Generator().manual_seed(seed % 2**31)
    x = torch.rand(batch, 1, 4, 4, generator=g)
    x[0, 0, 0, 0], x[-1, 0, -1, -1] = 0.0, 1.0  # pixels on the box edges
    y = torch.randint(0, 5, (batch,), generator=g)
    atk = make_attack(name, eps, norm=norm, seed=seed, **FAST[name])
    x_adv = atk(model, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float(flat_norm(x_adv - x, norm).max()) <= eps + 1e-5
    assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
    assert torch.equal(x_adv, make_attack(name, eps, norm=norm, seed=seed, **FAST[name])(model, x, y))
    # a point's example does not depend on the batch it comes in (what makes cascades exact)
    last = make_attack(name, eps, norm=norm, seed=seed, **FAST[name])(model, x[-1:], y[-1:])
    assert torch.allclose(last, x_adv[-1:], atol=1e-6)


def test_apgd_t_finds_the_one_weak_class_a_single_target_misses():
    """Linear 10-class model, label 0 everywhere: classes 1-8 sit closer in logit (gap 0.5) but are
    unreachable (no dependence on x); class 9 is further (gap 1) but reachable within eps. A random
    single target hits class 9 one time in nine; APGD-T tries every other class in turn."""
    torch.manual_seed(0)
    d, eps = 16, 0.1
    lin = nn.Linear(d, 10)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(-0.5)
        lin.bias[0] = 0.0
        lin.weight[9] = torch.sign(torch.randn(d)) * (2.0 / (eps * d))  # eps * ||w||_1 = 2 > gap 1
        lin.bias[9] = -1.0 - 0.5 * float(lin.weight[9].sum())  # z_9 = -1 + w_9 . (x - 0.5)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = 0.5 + (torch.rand(36, 1, 4, 4) - 0.5) * 0.1
    y = torch.zeros(36, dtype=torch.long)

    def robust(x_adv):
        with torch.no_grad():
            return int((model(x_adv).argmax(1) == y).sum())

    assert robust(x) == 36
    single = robust(make_attack("apgd", eps, loss="dlr", targeted=True, steps=20, seed=0)(model, x, y))
    multi = robust(make_attack("apgd-t", eps, steps=20, seed=0)(model, x, y))
    assert multi == 0
    assert single >= 20  # about 8/9 of the points survive a random target


def test_apgd_t_orders_targets_by_margin():
    """With one target, apgd-t attacks the class nearest in logit: it fools points whose only
    reachable class is also their runner-up."""
    model = _tiny(1)
    x = torch.rand(16, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    one = make_attack("apgd-t", 0.3, targets=1, steps=10, seed=0)
    assert one.params()["targets"] == 1 and one.params()["target_order"] == "clean logit margin"
    x_adv = one(model, x, y)
    with torch.no_grad():
        runner_up = model(x).scatter(1, y[:, None], float("-inf")).argmax(1)
        pred = model(x_adv).argmax(1)
    fooled = pred != y
    assert bool(fooled.any())
    assert bool((pred[fooled] == runner_up[fooled]).float().mean() > 0.5)


@pytest.fixture(scope="module")
def int8_digits(trained_digits):
    from rcomp.data.registry import get_dataset, make_loader
    from rcomp.models.loading import load
    from rcomp.quant.ptq import quantize

    model = load(trained_digits)
    ds = get_dataset("digits", "train", model.meta.input)
    calib = [x for x, _ in make_loader(ds, 64, shuffle=True, seed=0, n=128)]
    return model, quantize(model, calib)


def _digits(model, n: int):
    from rcomp.data.registry import get_dataset, make_loader

    ds = get_dataset("digits", "test", model.meta.input)
    return next(iter(make_loader(ds, n, n=n)))


def test_square_runs_on_real_int8_model_without_gradients(int8_digits, monkeypatch):
    _, qm = int8_digits
    x, y = _digits(qm, 32)
    with pytest.raises(RuntimeError):  # the int8 forward pass has no autograd
        torch.nn.functional.cross_entropy(qm(x.clone().requires_grad_(True)), y).backward()
    monkeypatch.setattr(qm, "gradient_model", lambda: (_ for _ in ()).throw(AssertionError("surrogate used")))
    calls = []
    qm.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    x_adv = make_attack("square", 0.2, queries=150, seed=0)(qm, x, y)
    assert calls and not any(calls)  # only forward passes, no autograd graph
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    with torch.inference_mode():
        clean, adv = (qm(x).argmax(1) == y), (qm(x_adv).argmax(1) == y)
    assert int(adv.sum()) < int(clean.sum())  # it fools the real int8 model
    assert qm.gradient_source == "fake-quant twin of int8"


def test_gradient_source_is_truthful(int8_digits):
    from rcomp.quant.ptq import quantize

    model, qm = int8_digits
    sim = quantize(model, [_digits(model, 64)[0]], bits=4, simulate=True)
    assert (model.gradient_source, sim.gradient_source, qm.gradient_source) == (
        "exact", "straight-through (fake-quant rounding)", "fake-quant twin of int8")


def _auto(suite: bool = True):
    from rcomp.attacks.auto import auto_stages

    if suite:
        return {"auto": make_attack("auto", 0.1, steps=15, queries=150, seed=3)}
    return auto_stages(0.1, steps=15, queries=150, seed=3, as_suite=False)


def test_cascade_final_figure_equals_independent_worst(trained_digits):
    from rcomp.data.registry import get_dataset, make_loader
    from rcomp.models.loading import load

    model = load(trained_digits)
    loader = make_loader(get_dataset("digits", "test", model.meta.input), 20, n=40)
    ind = evaluate(model, loader, _auto(suite=False), progress=False)
    cas = evaluate(model, loader, _auto(), progress=False)  # auto always cascades
    assert (ind.mode, cas.mode, cas.seed) == ("independent", "cascade", 3)
    assert list(cas.stage_robust_acc) == ["apgd-ce", "apgd-t", "square"]
    assert cas.worst_case_acc == ind.worst_case_acc < ind.clean_acc
    assert cas.stage_robust_acc == ind.stage_robust_acc
    assert cas.robust_acc["square"] == cas.worst_case_acc  # in a cascade: robust after every stage
    # the later stages of the cascade only attack the survivors
    assert cas.attacks["apgd-t"].attacked < ind.attacks["apgd-t"].attacked
    assert cas.gradient_masking_suspected == 0 == ind.gradient_masking_suspected
    assert evaluate(model, loader, _auto(suite=False), progress=False, cascade=True).stage_robust_acc == \
        cas.stage_robust_acc


class _HardRound(nn.Module):
    """Rounds its input to 1/8 steps with no straight-through: every input gradient is zero."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 8) / 8)


def test_masking_flag_fires_on_masked_gradients_only(trained_digits):
    from rcomp.data.registry import get_dataset, make_loader
    from rcomp.models.loading import load

    model = load(trained_digits)
    loader = make_loader(get_dataset("digits", "test", model.meta.input), 30, n=30)
    masked = evaluate(_HardRound(model).eval(), loader, _auto(), progress=False)
    plain = evaluate(model, loader, _auto(), progress=False)
    assert masked.gradient_masking_suspected >= 3
    assert masked.stage_robust_acc["square"] < masked.stage_robust_acc["apgd-t"]
    assert plain.gradient_masking_suspected == 0
    # without a gradient-free attack the check is not defined
    only_grad = evaluate(model, loader, {"apgd": make_attack("apgd", 0.1, steps=5, seed=0)}, progress=False)
    assert only_grad.gradient_masking_suspected is None and only_grad.mode == "independent"


def test_user_list_cascades_on_request(trained_digits):
    from rcomp.data.registry import get_dataset, make_loader
    from rcomp.evaluation.bench import build_attacks
    from rcomp.models.loading import load
    from rcomp.parsing import parse_eps_list

    model = load(trained_digits)
    loader = make_loader(get_dataset("digits", "test", model.meta.input), 30, n=30)
    atk = build_attacks(["fgsm", "pgd"], [0.1], lenient=True, steps=5, seed=0)
    res = evaluate(model, loader, atk, progress=False, cascade=True)
    assert res.mode == "cascade" and res.attacks["pgd"].attacked <= res.attacks["fgsm"].attacked
    assert res.stage_robust_acc["pgd"] == res.worst_case_acc <= res.stage_robust_acc["fgsm"]
    keys = build_attacks(["auto", "pgd"], parse_eps_list("0.1,8/255"), lenient=True, steps=5, alpha=0.01, queries=10, seed=0)
    assert list(keys)[:3] == ["apgd-ce@0.1", "apgd-t@0.1", "square@0.1"] and "pgd@8/255" in keys


@pytest.mark.parametrize("kw,needle", [
    ({"name": "square", "eps": 0.1, "alpha": 0.01}, "--alpha"),
    ({"name": "square", "eps": 0.1, "steps": 10}, "queries"),
    ({"name": "square", "eps": 0.1, "restarts": 2}, "restarts"),
    ({"name": "square", "eps": 0.1, "queries": 0}, "query"),
    ({"name": "apgd-t", "eps": 0.1, "alpha": 0.01}, "--alpha"),
    ({"name": "apgd-t", "eps": 0.1, "targets": 0}, "target"),
    ({"name": "auto", "eps": 0.1, "loss": "ce"}, "--loss"),
    ({"name": "autoo", "eps": 0.1}, "did you mean auto"),
    ({"name": "pgd", "eps": 0.1, "queries": 100}, "pgd takes no queries"),
])
def test_make_attack_refuses(kw, needle):
    with pytest.raises(RcompError) as info:
        make_attack(**kw)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_apgd_t_needs_four_classes_for_dlr():
    with pytest.raises(RcompError, match="4 classes"):
        make_attack("apgd-t", 0.1, steps=2)(_tiny(classes=3), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
    x_adv = make_attack("apgd-t", 0.1, steps=2, loss="ce")(_tiny(classes=3), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
    assert x_adv.shape == (2, 1, 4, 4)


def test_auto_uses_a_cheaper_square_and_says_so():
    from rcomp.attacks import make_attack

    auto = make_attack("auto", 0.1)
    assert auto.stages["square"].queries == 1000 and make_attack("square", 0.1).queries == 5000
    assert make_attack("auto", 0.1, queries=5000).stages["square"].queries == 5000


class _Counting(nn.Module):
    """Counts the images that go through forward+backward passes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x):
        if x.requires_grad:
            self.images += x.shape[0]
        return self.net(x)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.05, 0.6), batch=st.integers(2, 6),
       seed=st.integers(0, 2**31), loss=st.sampled_from(["ce", "dlr"]))
def test_apgd_drops_fooled_points_without_changing_any_example(norm, eps, batch, seed, loss):
    """APGD attacks only the points not yet fooled: each point's example is the one it gets alone."""
    from rcomp.attacks.auto import PointwiseAPGD

    model = _tiny(seed % 7)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 4, 4, generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    counted = _Counting(model)
    x_adv = PointwiseAPGD(eps, norm, steps=12, loss=loss, seed=seed)(counted, x, y)
    alone = [PointwiseAPGD(eps, norm, steps=12, loss=loss, seed=seed)(model, x[i:i + 1], y[i:i + 1]) for i in range(batch)]
    alone = torch.cat(alone)
    # equal up to float noise (a batch of another size takes other kernels; it grows over 12 steps)
    assert torch.allclose(x_adv, alone, atol=1e-3)
    # no more passes than attacking every point for the full budget, fewer when some point was fooled early
    assert counted.images <= batch * 13


def test_apgd_stops_spending_passes_on_fooled_points():
    """Half the batch is fooled by the first step: those points cost two passes, the rest the full budget."""
    from rcomp.attacks.apgd import APGD

    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    model = nn.Sequential(nn.Flatten(), lin).eval()
    # points of class 0 near the boundary x0 == x1 (fooled at once) and far from it (never fooled)
    x = torch.tensor([[0.51, 0.50], [0.52, 0.50], [1.0, 0.0], [0.95, 0.0]]).view(4, 1, 1, 2)
    y = torch.zeros(4, dtype=torch.long)
    counted = _Counting(model)
    x_adv = APGD(0.05, steps=20, random_start=False)(counted, x, y)
    fooled = model(x_adv).argmax(1) != y
    assert fooled.tolist() == [True, True, False, False]
    assert counted.images == 4 + 4 + 2 * 19  # the start and step 1 on all four, then 19 steps on two


def _restarts_seen(monkeypatch) -> dict[str, list[int]]:
    """Record the random stream of every APGD run, by attack name."""
    from rcomp.attacks.apgd import APGD

    seen: dict[str, list[int]] = {}
    run = APGD._run

    def spy(self, model, x, y, target, restart):
        seen.setdefault(self.name, []).append(restart)
        return run(self, model, x, y, target, restart)

    monkeypatch.setattr(APGD, "_run", spy)
    return seen


def test_auto_tries_four_targets_and_more_restarts_on_surrogate_gradients(int8_digits, monkeypatch):
    model, qm = int8_digits
    assert make_attack("auto", 0.1).stages["apgd-t"].targets == 4
    assert make_attack("apgd-t", 0.1).targets == 9  # the stand-alone attack keeps the reference
    assert make_attack("auto", 0.1, targets=9).stages["apgd-t"].targets == 9
    assert make_attack("auto", 0.1).stages["apgd-ce"].params()["restarts_on_surrogate_gradients"] == 3
    x, y = _digits(model, 12)
    for m, asked, ce, t in [(model, None, [0], [0, 1, 2, 3]),  # exact gradients: 1 restart
                            (qm, None, [0, 1, 2], [i + r * 1024 for i in range(4) for r in range(3)]),
                            (model, 2, [0, 1], [i + r * 1024 for i in range(4) for r in range(2)]),
                            (qm, 2, [0, 1], [i + r * 1024 for i in range(4) for r in range(2)])]:
        seen = _restarts_seen(monkeypatch)
        # eps so small that no point falls: every restart of every target runs
        make_attack("auto", 1e-4, steps=2, queries=2, restarts=asked, seed=0)(m, x, y)
        assert sorted(seen["apgd"]) == ce and sorted(seen["apgd-t"]) == sorted(t), (m.gradient_source, asked)


def test_more_apgd_t_restarts_never_find_fewer_examples(trained_digits):
    """Restart r of target i draws its own stream: 3 restarts repeat the 1-restart run, then add to it."""
    from rcomp.models.loading import load
    from rcomp.quant.ptq import quantize

    model = load(trained_digits)
    sim = quantize(model, [_digits(model, 64)[0]], bits=4, simulate=True)
    x, y = _digits(sim, 48)
    fooled = {}
    for r in (1, 3):
        adv = make_attack("apgd-t", 0.08, steps=6, targets=3, restarts=r, seed=1)(sim, x, y)
        with torch.inference_mode():
            fooled[r] = sim(adv).argmax(1) != y
    assert bool((fooled[1] <= fooled[3]).all())


def test_cli_says_when_auto_runs_more_restarts(int8_digits, tmp_path, cli):
    from rcomp.models.loading import save

    model, qm = int8_digits
    for m, name in ((model, "float"), (qm, "int8")):
        path = tmp_path / f"{name}.safetensors"
        save(m, path)
        res = cli("attack", path, "--data", "digits", "-n", "8", "--attack", "auto", "--eps", "0.1", "--steps", "2",
                  "--queries", "3")
        assert res.code == 0, res.stderr
        said = "gradients are a surrogate (fake-quant twin of int8), so its APGD stages run 3 random restarts"
        assert (said in res.stderr) == (name == "int8"), res.stderr
        quiet = cli("attack", path, "--data", "digits", "-n", "8", "--attack", "auto", "--eps", "0.1", "--steps", "2",
                    "--queries", "3", "--restarts", "1")
        assert quiet.code == 0 and "surrogate" not in quiet.stderr
