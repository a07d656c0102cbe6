"""Single-step adversarial training: N-FGSM, GradAlign, their cost in passes, the catastrophic-overfitting guard."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcomp.errors import RcompError
from rcomp.train.adversarial import AdvConfig, adversarial_examples, grad_align_term
from rcomp.train.budget import passes_per_step, steps_for_fraction, training_cost
from rcomp.train.guards import (
    CO_DROP,
    CO_GAP,
    CO_GAP_RATIO,
    CO_RATIO,
    OverfitGuard,
    fall_needed,
    gap_needed,
    overfit_collapsed,
    overfit_gap,
)


def _mlp(seed=0):
    from rcomp.models.registry import build_model

    torch.manual_seed(seed)
    return build_model("mlp", 10, (1, 8, 8)).train()


# ----------------------------------------------------------------------------- N-FGSM


@settings(max_examples=20, deadline=None)
@given(eps=st.floats(0.01, 0.2), k=st.floats(0.0, 3.0), seed=st.integers(0, 20))
def test_nfgsm_leaves_the_ball_by_design_but_stays_within_k_eps_plus_alpha(eps, k, seed):
    model = _mlp(seed)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    cfg = AdvConfig("n-fgsm", eps, noise=k).resolved()
    assert cfg.alpha == pytest.approx(eps) and cfg.steps == 1  # the paper's defaults: step eps, one step
    x_adv = adversarial_examples(model, x, y, cfg, torch.Generator().manual_seed(seed), seed)
    dist = (x_adv - x).abs().flatten(1).amax(1)
    assert (dist <= k * eps + eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())
    again = adversarial_examples(model, x, y, cfg, torch.Generator().manual_seed(seed), seed)
    assert torch.equal(x_adv, again)  # seeded


def test_nfgsm_is_not_projected_back_to_the_eps_ball():
    """With noise 2 eps and step eps, interior pixels move up to 3 eps: no projection (de Jorge et al.)."""
    model = _mlp()
    x = 0.25 + 0.5 * torch.rand(64, 1, 8, 8)          # away from the [0, 1] edges
    y = torch.randint(0, 10, (64,))
    eps = 0.05
    x_adv = adversarial_examples(model, x, y, AdvConfig("n-fgsm", eps).resolved(), torch.Generator(), 3)
    d = (x_adv - x).abs()
    assert d.max() > 2 * eps       # far outside the eps ball
    assert d.max() <= 3 * eps + 1e-6
    fgsm = adversarial_examples(model, x, y, AdvConfig("fgsm", eps).resolved(), torch.Generator(), 3)
    assert (fgsm - x).abs().max() <= eps + 1e-6  # fgsm still projects


def test_adv_config_refusals():
    with pytest.raises(RcompError, match="linf"):
        AdvConfig("n-fgsm", 0.1, norm="l2").resolved()
    with pytest.raises(RcompError, match="single-step"):
        AdvConfig("pgd", 0.1, grad_align=0.2).resolved()
    with pytest.raises(RcompError, match="noise"):
        AdvConfig("n-fgsm", 0.1, noise=-1.0).resolved()
    assert AdvConfig("fgsm", 0.1, random_start=False).resolved().alpha == pytest.approx(0.1)
    assert AdvConfig("fgsm", 0.1).resolved().alpha == pytest.approx(0.125)


# ----------------------------------------------------------------------------- GradAlign


def test_grad_align_term_is_a_cosine_distance_and_reaches_the_parameters():
    model = _mlp()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    reg = grad_align_term(model, x, y, 0.1, torch.Generator().manual_seed(0))
    assert reg.shape == (8,) and (reg >= -1e-6).all() and (reg <= 2 + 1e-6).all()
    reg.sum().backward()  # double backprop: fails if the second gradient were built without create_graph
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    # eps 0: both gradients are taken at x, the regulariser vanishes
    zero = grad_align_term(model, x, y, 0.0, torch.Generator().manual_seed(0))
    assert float(zero.detach().abs().max()) < 1e-5


def test_grad_align_changes_the_loss_only_by_its_term():
    from rcomp.train.adversarial import batch_loss

    model = _mlp()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    base = AdvConfig("n-fgsm", 0.1).resolved()
    reg = AdvConfig("n-fgsm", 0.1, grad_align=0.5).resolved()
    l0, _, _ = batch_loss(model, model, x, y, base, torch.Generator().manual_seed(1), 5)
    g = torch.Generator().manual_seed(1)
    l1, _, _ = batch_loss(model, model, x, y, reg, g, 5)
    term = grad_align_term(model, x, y, 0.1, torch.Generator().manual_seed(1))
    assert torch.allclose(l1, l0 + 0.5 * term, atol=1e-5)


# ----------------------------------------------------------------------------- budget


def test_passes_per_step_table():
    assert passes_per_step("none", None) == 1
    assert passes_per_step("fgsm", 1) == 2 and passes_per_step("n-fgsm", 1) == 2
    assert passes_per_step("pgd", 7) == 8 and passes_per_step("pgd", None) == 11
    assert passes_per_step("trades", 10) == 12      # 10 attack steps + a training pass on a double batch
    assert passes_per_step("n-fgsm", 1, 0.2) == 6   # GradAlign: 4 more
    assert passes_per_step("fgsm", 1, 0.0) == 2
    with pytest.raises(RcompError):
        passes_per_step("bogus", 1)
    entry = {"command": "finetune", "params": {"adv": "n-fgsm", "steps": 1, "grad_align": 0.2},
             "metrics": {"steps": 10}}
    assert training_cost(entry) == 60


@settings(max_examples=50, deadline=None)
@given(frac=st.floats(0.01, 2.0), ref_steps=st.integers(1, 500), ref_attack=st.integers(1, 12),
       mode=st.sampled_from(["none", "fgsm", "n-fgsm", "pgd", "trades"]), attack=st.integers(1, 12),
       ga=st.sampled_from([0.0, 0.3]))
def test_steps_for_fraction_spends_the_fraction_in_passes(frac, ref_steps, ref_attack, mode, attack, ga):
    if ga and mode not in ("fgsm", "n-fgsm"):
        ga = 0.0
    ref = [{"command": "finetune", "params": {"adv": "pgd", "steps": ref_attack}, "metrics": {"steps": ref_steps}}]
    ref_passes = ref_steps * (1 + ref_attack)
    steps = steps_for_fraction(frac, ref, mode, attack, grad_align=ga)
    per = passes_per_step(mode, attack, ga)
    assert steps >= 1
    if frac * ref_passes >= per:  # the nearest whole step: within half a step's passes of the target
        assert abs(steps * per - frac * ref_passes) <= per / 2 + 1e-9


# ----------------------------------------------------------------------------- the overfitting rule


def test_overfit_rule_cases():
    assert overfit_collapsed(0.02, 0.5, 0.9, 0.6)           # PGD collapsed while FGSM accuracy rose
    assert overfit_collapsed(0.02, 0.5, None, None)         # best was the starting model
    assert not overfit_collapsed(0.02, 0.5, 0.3, 0.6)       # everything fell: not overfitting (other guards)
    assert not overfit_collapsed(0.30, 0.5, 0.9, 0.6)       # a dip, not a collapse
    assert not overfit_collapsed(0.01, 0.08, 0.9, 0.6)      # from near 0 to 0: noise, nothing to lose


@settings(max_examples=200, deadline=None)
@given(pgd=st.floats(0, 1), best=st.floats(0, 1), adv=st.floats(0, 1), adv_best=st.floats(0, 1))
def test_overfit_rule_property(pgd, best, adv, adv_best):
    hit = overfit_collapsed(pgd, best, adv, adv_best)
    if hit:
        assert pgd <= CO_RATIO * best and best - pgd >= CO_DROP and adv >= adv_best - 0.05 - 1e-12
    if pgd >= best:
        assert not hit  # never at or above the best


@pytest.mark.parametrize("best,pgd,fires", [
    (0.203, 0.100, False),   # N-FGSM on digits at eps 0.2, epoch 5 (healthy; measured 0.203 -> 0.102): noise
    (0.16, 0.06, False),     # N-FGSM on fake at eps 0.175 from a trained start (last session's false alarm)
    (0.29, 0.11, True),      # plain FGSM on fake at eps 0.175 (last session): a real fall
    (0.33, 0.10, True),
    (0.6, 0.05, True),
])
def test_fall_rule_is_noise_aware_on_128_images(best, pgd, fires):
    assert overfit_collapsed(pgd, best, None, None, n=128) == fires
    assert overfit_collapsed(pgd, best, None, None)  # without n, the plain CO_DROP rule: all of these fall


@settings(max_examples=200, deadline=None)
@given(best=st.floats(0, 1), n=st.integers(1, 10_000), m=st.integers(1, 10_000))
def test_fall_needed_is_at_least_co_drop_and_shrinks_with_more_images(best, n, m):
    assert fall_needed(best, n) >= CO_DROP
    if n <= m:
        assert fall_needed(best, n) >= fall_needed(best, m)
    assert fall_needed(best, None) == CO_DROP
    assert fall_needed(0.5, 128) > 0.18 and fall_needed(0.0, 128) == CO_DROP


@pytest.mark.parametrize("single,pgd,fires", [
    (0.586, 0.039, True),    # plain FGSM on fake at eps 0.2, epoch 10: never robust, overfit from the start
    (0.453, 0.055, True),    # plain FGSM on fake at eps 0.175, epoch 9
    (0.906, 0.438, False),   # FGSM with random start on fake at eps 0.15 (healthy: N-FGSM reaches PGD 0.42 there)
    (0.781, 0.539, False),   # FGSM with random start on digits at eps 0.2 (gap 0.24)
    (0.30, 0.02, False),     # gap below CO_GAP: the adversary leaves too little to call it beaten
    (0.5, 0.5, False),
])
def test_gap_rule_cases(single, pgd, fires):
    assert overfit_gap(single, pgd, n=128) == fires


@settings(max_examples=300, deadline=None)
@given(single=st.floats(0, 1), pgd=st.floats(0, 1), lower=st.floats(0, 1), n=st.integers(1, 4096))
def test_gap_rule_property(single, pgd, lower, n):
    hit = overfit_gap(single, pgd, n)
    if hit:
        assert single - pgd >= max(CO_GAP, gap_needed(n)) - 1e-12 and pgd <= CO_GAP_RATIO * single
        assert overfit_gap(single, pgd * lower, n)        # a lower PGD figure fires too
    if pgd >= single or single < CO_GAP:
        assert not hit
    assert gap_needed(n) >= CO_GAP and gap_needed(4) > gap_needed(128)


def _figures(monkeypatch, rows):
    """Script the guard's (clean, pgd, single) per check."""
    it = iter(rows)
    cur = {}

    def pgd(self, m):
        cur["row"] = next(it)
        self.num_classes = 10
        return cur["row"][0], cur["row"][1]

    monkeypatch.setattr(OverfitGuard, "pgd_accuracy", pgd)
    monkeypatch.setattr(OverfitGuard, "single_accuracy", lambda self, m: cur["row"][2])


def test_gap_rule_fires_on_a_run_that_never_gained_robustness(monkeypatch):
    """Plain FGSM on fake at eps 0.2: PGD never rises above its start, so the fall rule cannot see it."""
    _figures(monkeypatch, [(0.08, 0.08, 0.08), (0.5, 0.06, 0.2), (0.9, 0.04, 0.59)])
    guard = OverfitGuard(torch.rand(128, 1, 8, 8), torch.arange(128) % 10, 0.2, "linf", seed=1,
                         adv=AdvConfig("fgsm", 0.2, random_start=False).resolved())
    model = _mlp()
    assert guard.check(model, 0, None) is None
    assert guard.check(model, 1, 0.3) is None     # gap 0.14: not yet
    hit = guard.check(model, 2, 0.8)
    assert hit is not None and hit["rule"] == "gap" and hit["best_epoch"] == 0 and hit["single"] == 0.59
    msg = guard.message()
    assert "catastrophic overfitting in epoch 2" in msg and "fgsm without random start" in msg
    assert "0.590" in msg and "PGD-5 only 0.040" in msg and "the starting weights" in msg


@pytest.mark.parametrize("rows", [
    [(0.9, 0.05, 0.8)],                              # the starting weights: not trained single-step yet
    [(0.1, 0.1, 0.1), (0.15, 0.0, 0.15)],            # at chance (clean 0.15 < 0.19): nothing to judge
    [(0.1, 0.1, 0.1), (0.9, 0.45, 0.9)],             # robust enough: PGD keeps half of what FGSM leaves
])
def test_gap_rule_stays_quiet(monkeypatch, rows):
    _figures(monkeypatch, rows)
    guard = OverfitGuard(torch.rand(128, 1, 8, 8), torch.arange(128) % 10, 0.2, "linf", seed=1,
                         adv=AdvConfig("n-fgsm", 0.2).resolved())
    for i in range(len(rows)):
        assert guard.check(_mlp(), i, None) is None
    assert guard.collapse is None


@pytest.mark.parametrize("adv", [AdvConfig("fgsm", 0.1, random_start=False), AdvConfig("fgsm", 0.1),
                                 AdvConfig("n-fgsm", 0.1)])
def test_single_accuracy_is_the_training_adversarys_seeded_and_side_effect_free(adv):
    from rcomp.attacks import make_attack
    from rcomp.train.adversarial import training_attack

    model = _mlp()
    x, y = torch.rand(64, 1, 8, 8), torch.arange(64) % 10
    adv = adv.resolved()
    guard = OverfitGuard(x, y, 0.1, "linf", seed=3, adv=adv)
    a = guard.single_accuracy(model)
    assert a == guard.single_accuracy(model)  # the same seeded noise at every check
    assert model.training and all(p.grad is None for p in model.parameters())
    from rcomp.seeding import derive_seed

    want = guard._accuracy(model, training_attack(adv, derive_seed(3, 1)))[1]
    assert a == want
    if adv.mode == "fgsm" and not adv.random_start:
        assert a == guard._accuracy(model, make_attack("fgsm", 0.1))[1]  # plain FGSM is its own training adversary
    assert OverfitGuard(x, y, 0.1, "linf", seed=3).single_accuracy(model) is None


def test_guard_restores_the_best_weights_exactly():
    model = _mlp()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    guard = OverfitGuard(x, y, 0.1, "linf", seed=1)
    guard.best = {"epoch": 0, "pgd": -1.0, "train_adv": None}
    guard.check(model, 1, None)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    guard.restore_best(model)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert model.training  # the check leaves the mode as it found it
    # fixed and seeded: the same weights give the same figure
    assert guard.pgd_accuracy(model) == guard.pgd_accuracy(model)


@pytest.mark.parametrize("clean_at_best,fires", [(0.117, False), (0.18, False), (0.19, True), (0.95, True)])
def test_guard_ignores_a_fall_from_a_model_at_chance(monkeypatch, clean_at_best, fires):
    """Measured on `fake` at eps 0.25: a model that never learnt (clean 0.11) had its PGD figure fall from 0.117 to
    0.008, which the fall rule without its noise term calls a collapse. Robustness a model at chance never had is
    not lost: the best check must be above the chance level (0.19 for 10 classes), as the collapse monitor's.
    (That fall is also within the noise of 128 images now; a larger one, 0.3 -> 0.02, isolates the chance test.)"""
    model = _mlp()
    x, y = torch.rand(128, 1, 8, 8), torch.arange(128) % 10
    assert not overfit_collapsed(0.008, 0.117, None, None, n=128)
    figures = iter([(clean_at_best, 0.3), (clean_at_best, 0.02)])
    monkeypatch.setattr(OverfitGuard, "pgd_accuracy", lambda self, m: next(figures))
    guard = OverfitGuard(x, y, 0.1, "linf", seed=1, num_classes=10)
    assert guard.chance_level() == pytest.approx(0.19)
    assert guard.check(model, 0, None) is None
    hit = guard.check(model, 1, 0.2)
    assert (hit is not None) == fires and (guard.collapse is not None) == fires


def test_guard_learns_the_class_count_from_the_model():
    guard = OverfitGuard(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), 0.1, "linf", seed=1)
    guard.pgd_accuracy(_mlp())
    assert guard.num_classes == 10


# ----------------------------------------------------------------------------- the command line

SMALL = ["--data", "digits", "-n", "256", "--batch-size", "64", "--eval-n", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def pgd_ref(tmp_path_factory):
    from tests.conftest import run_cli

    ref = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    res = run_cli("finetune", "--arch", "convnet8", *SMALL, "--adv", "pgd", "--eps", "0.1", "--steps", "3",
                  "--epochs", "1", "-o", ref)
    assert res.code == 0, res.stderr  # 4 steps x (1 + 3) = 16 passes
    return ref


@pytest.mark.parametrize("args, steps, per", [
    (["--adv", "n-fgsm"], 8, 2),
    (["--adv", "fgsm", "--grad-align", "0.2"], 3, 6),        # 16 / 6 = 2.67 -> 3
    (["--adv", "trades", "--steps", "2"], 4, 4),
    (["--adv", "pgd", "--steps", "3"], 4, 4),
    (["--adv", "none"], 16, 1),
])
def test_budget_fraction_picks_steps_from_passes_for_every_mode(cli, pgd_ref, tmp_path, args, steps, per):
    import rcomp
    from rcomp.train.budget import history_cost

    out = tmp_path / "ft.safetensors"
    res = cli("finetune", pgd_ref, *SMALL, "--eps", "0.1", *args, "--budget-of", pgd_ref, "--budget-fraction", "1",
              "--epochs", "10", "-o", out)
    assert res.code == 0, res.stderr
    assert f"budget: {steps} steps x {per} passes" in res.stderr
    hist = rcomp.load(out).meta.history
    assert hist[-1]["metrics"]["steps"] == steps
    assert history_cost(hist[-1:]) == steps * per  # the recorded run is costed the same way


def test_nfgsm_and_grad_align_record_their_settings_and_guard(cli, pgd_ref, tmp_path):
    import rcomp

    out = tmp_path / "n.safetensors"
    res = cli("finetune", pgd_ref, *SMALL, "--adv", "n-fgsm", "--eps", "0.1", "--grad-align", "0.2", "--epochs", "2",
              "-o", out)
    assert res.code == 0, res.stderr
    h = rcomp.load(out).meta.history[-1]
    p = h["params"]
    assert p["adv"] == "n-fgsm" and p["noise"] == 2.0 and p["grad_align"] == 0.2
    assert p["alpha"] == pytest.approx(0.1) and p["steps"] == 1
    g = h["metrics"]["overfit_guard"]
    assert len(g["pgd_acc"]) == 3 and g["collapse"] is None  # the starting weights and 2 epochs
    assert "overfitting guard: PGD-5 accuracy and the training adversary's (n-fgsm) on 128 fixed training images" \
        in res.stderr
    assert all("guard_pgd_acc" in e and "guard_single_acc" in e for e in h["metrics"]["epochs"])
    assert len(g["single_acc"]) == 3 and g["single_attack"] == "n-fgsm"
    assert g["guard_passes"] == pytest.approx(3 * (6 + 2) * 128 / 64)  # PGD-5 (6 passes), the adversary (2)


@pytest.mark.parametrize("args, needles", [
    (["--adv", "n-fgsm", "--norm", "l2"], ["n-fgsm", "linf"]),
    (["--adv", "pgd", "--grad-align", "0.2"], ["--grad-align", "fgsm"]),
    (["--adv", "n-fgsm", "--noise", "-1"], ["--noise"]),
])
def test_refusals(cli, pgd_ref, tmp_path, args, needles):
    from tests.conftest import assert_one_line_error

    res = cli("finetune", pgd_ref, *SMALL, "--eps", "0.1", *args, "-o", tmp_path / "x.safetensors")
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- the guard inside the loop


def _digits_subset(n=256):
    from rcomp.data.registry import get_dataset
    from rcomp.spec import InputSpec

    ds = get_dataset("digits", "train", InputSpec(1, 8, 8, [0.5], [0.25]))
    return ds.subset(range(n)) if hasattr(ds, "subset") else torch.utils.data.Subset(ds, range(n))


def _scripted(monkeypatch, figures, singles=None):
    """The guard's PGD figures in order (the loop's plumbing under test, not the attack); weights per check.
    ``singles``: the training adversary's figures in order (default: equal to PGD's, so the gap rule is quiet)."""
    seen = []

    def fake(self, module):
        seen.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return 1.0, figures[len(seen) - 1]

    monkeypatch.setattr(OverfitGuard, "pgd_accuracy", fake)
    monkeypatch.setattr(OverfitGuard, "single_accuracy",
                        lambda self, module: (singles or figures)[len(seen) - 1] if self.adv is not None else None)
    return seen


@pytest.mark.parametrize("allow", [False, True])
def test_loop_stops_restores_best_and_fails_unless_allowed(monkeypatch, allow):
    from rcomp.errors import TrainingFailed
    from rcomp.models.registry import build_model
    from rcomp.train import TrainConfig, finetune

    seen = _scripted(monkeypatch, [0.3, 0.6, 0.5, 0.05, 0.9, 0.9])
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8))
    cfg = TrainConfig(epochs=6, batch_size=64, adv=AdvConfig("n-fgsm", 0.1), progress=False, allow_collapse=allow)
    if not allow:
        with pytest.raises(TrainingFailed, match="catastrophic overfitting in epoch 3.*after epoch 1 were restored"):
            finetune(model, _digits_subset(), cfg)
        assert len(seen) == 4  # the start and epochs 1-3: training stopped at the collapse
        return
    out, metrics = finetune(model, _digits_subset(), cfg)
    assert len(seen) == 4 and metrics["steps"] == 3 * 4  # 3 epochs of 4 steps, then stopped
    best = seen[1]  # the weights the check after epoch 1 saw (PGD 0.6, the best)
    assert all(torch.equal(best[k], v) for k, v in out.state_dict().items())
    g = metrics["overfit_guard"]
    assert g["collapse"] == {"epoch": 3, "rule": "fall", "pgd": 0.05, "single": 0.05,
                             "train_adv": metrics["epochs"][-1]["train_adv_acc"], "best_epoch": 1, "best_pgd": 0.6}
    assert g["pgd_acc"] == [0.3, 0.6, 0.5, 0.05] and metrics["epochs"][-1]["overfit_collapse"]["epoch"] == 3


def test_loop_gap_rule_stops_and_restores_the_best_check(monkeypatch):
    """Scripted: PGD never falls (the fall rule stays quiet) while the training adversary is beaten 0.6 at epoch 2."""
    from rcomp.models.registry import build_model
    from rcomp.train import TrainConfig, finetune

    seen = _scripted(monkeypatch, [0.1, 0.12, 0.05, 0.3], singles=[0.1, 0.3, 0.6, 0.9])
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8))
    cfg = TrainConfig(epochs=4, batch_size=64, adv=AdvConfig("fgsm", 0.1, random_start=False), progress=False,
                      allow_collapse=True)
    out, metrics = finetune(model, _digits_subset(), cfg)
    g = metrics["overfit_guard"]
    assert len(seen) == 3 and metrics["steps"] == 2 * 4  # stopped after epoch 2
    assert g["collapse"]["rule"] == "gap" and g["collapse"]["best_epoch"] == 1 and g["collapse"]["single"] == 0.6
    assert g["single_acc"] == [0.1, 0.3, 0.6] and g["single_attack"] == "fgsm without random start"
    assert [e["guard_single_acc"] for e in metrics["epochs"]] == [0.3, 0.6]
    assert all(torch.equal(seen[1][k], v) for k, v in out.state_dict().items())  # epoch 1's weights, the best


def test_guard_is_off_for_multi_step_training(monkeypatch):
    from rcomp.models.registry import build_model
    from rcomp.train import TrainConfig, finetune

    seen = _scripted(monkeypatch, [0.5] * 10)
    model = build_model("mlp", 10, (1, 8, 8))
    _, metrics = finetune(model, _digits_subset(128), TrainConfig(epochs=1, batch_size=64,
                                                                 adv=AdvConfig("pgd", 0.1, steps=1), progress=False))
    assert seen == [] and "overfit_guard" not in metrics


def test_cli_collapse_exits_1_writes_nothing_and_allow_collapse_writes_the_best(cli, pgd_ref, tmp_path, monkeypatch):
    """End to end through `rcomp finetune`, with the guard's PGD figures scripted (collapse after epoch 2)."""
    import rcomp

    seen = _scripted(monkeypatch, [0.2, 0.5, 0.01, 0.9])
    out = tmp_path / "co.safetensors"
    args = ("finetune", pgd_ref, *SMALL, "--adv", "fgsm", "--no-random-start", "--eps", "0.1", "--epochs", "4",
            "-o", out)
    res = cli(*args)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rcomp: error:")]
    assert res.code == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "catastrophic overfitting in epoch 2" in lines[0] and "--allow-collapse" in lines[0]
    assert not out.exists()
    seen.clear()
    res = cli(*args, "--allow-collapse")
    assert res.code == 0, res.stderr
    assert "warning: catastrophic overfitting in epoch 2" in res.stderr and "writing them" in res.stderr
    h = rcomp.load(out).meta.history[-1]
    assert h["metrics"]["overfit_guard"]["collapse"]["best_epoch"] == 1
    assert h["metrics"]["steps"] == 2 * 4 and h["params"]["random_start"] is False
    sd = rcomp.load(out).state_dict()
    assert set(seen[1]) <= set(sd) and all(torch.equal(sd[k], v) for k, v in seen[1].items())  # the best weights


# ----------------------------------------------------------------------------- the gap rule, end to end

#: issue 25's target run (benchmarks/bench_co_guard.py, docs/benchmarks.md): the built-in mlp on `fake` at eps 0.2.
#: Plain FGSM overfits from its first epoch (training adversary 0.12 -> 0.36, PGD-5 never above 0.08: no robustness
#: gained, so the fall rule is blind); N-FGSM at the same eps learns (PGD-5 0.02 -> 0.2, clean 1.0 on its checks).
CO_RUN = ["--arch", "mlp", "--input-shape", "1,8,8", "--data", "fake", "--no-augment", "--eps", "0.2",
          "--epochs", "6", "--device", "cpu", "--seed", "0"]


@pytest.mark.slow
def test_cli_guard_fires_on_plain_fgsm_and_stays_quiet_on_nfgsm_at_the_same_eps(cli, tmp_path):
    import rcomp

    out = tmp_path / "co.safetensors"
    fgsm = ("finetune", *CO_RUN, "--eval-n", "0", "--adv", "fgsm", "--no-random-start", "-o", out)
    res = cli(*fgsm)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rcomp: error:")]
    assert res.code == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "catastrophic overfitting in epoch 6" in lines[0] and "fgsm without random start" in lines[0]
    assert "--allow-collapse" in lines[0] and "were restored" in lines[0]
    assert not out.exists()
    res = cli(*fgsm, "--allow-collapse")
    assert res.code == 0, res.stderr
    assert "warning: catastrophic overfitting in epoch 6" in res.stderr and "writing them" in res.stderr
    h = rcomp.load(out).meta.history[-1]["metrics"]
    g, c = h["overfit_guard"], h["overfit_guard"]["collapse"]
    assert c["rule"] == "gap" and c["epoch"] == 6 and c["single"] - c["pgd"] >= CO_GAP
    assert c["pgd"] <= CO_GAP_RATIO * c["single"] and g["single_acc"][-1] == c["single"]
    assert h["epochs"][-1]["overfit_collapse"]["rule"] == "gap"
    pgd = g["pgd_acc"]
    assert c["best_pgd"] == max(pgd[:-1]) and pgd[c["best_epoch"]] == c["best_pgd"]
    # never gained robustness to lose: the fall rule alone would have let this run through
    assert not any(overfit_collapsed(p, max(pgd[:i]), None, None, n=128) for i, p in enumerate(pgd) if i)

    out = tmp_path / "n.safetensors"
    res = cli("finetune", *CO_RUN, "--eval-n", "200", "--adv", "n-fgsm", "-o", out)
    assert res.code == 0, res.stderr
    assert "catastrophic" not in res.stderr
    h = rcomp.load(out).meta.history[-1]["metrics"]
    g = h["overfit_guard"]
    assert g["collapse"] is None and len(g["pgd_acc"]) == 7
    assert h["test_clean_acc"] >= 0.8           # it learns: chance is 0.1
    assert max(g["pgd_acc"]) >= 0.15            # and gains robustness where plain FGSM gained none
    assert max(s - p for s, p in zip(g["single_acc"][1:], g["pgd_acc"][1:], strict=True)) < CO_GAP
