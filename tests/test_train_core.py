"""rcomp.train on the shared attack core and evaluation loop, and its guards.

One attack core (training's PGD/TRADES adversaries are rcomp.attacks objects, bit-identical to
the projected-gradient loops they replaced), one evaluation loop (clean accuracy through
rcomp.evaluation), non-finite and collapsed runs fail with exit code 1, a corrupt resume state is
refused, and a step budget stops training at exactly that many optimizer steps.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

torch.set_num_threads(1)


def _net(seed: int = 0):
    from rcomp.models.registry import build_model

    torch.manual_seed(seed)
    return build_model("convnet8", 10, (1, 8, 8)).eval()


class _Data:
    """An in-memory dataset (the fast path of rcomp.evaluation.accuracy.fetch)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@pytest.fixture(scope="module")
def digits():
    from rcomp.data.registry import get_dataset

    ds = get_dataset("digits", "train", _net().meta.input)
    return _Data(ds.images[:256].clone(), ds.labels[:256].clone())


# ---------------------------------------------------------------------------
# the pre-change training adversaries, kept here as the reference (linf)
# ---------------------------------------------------------------------------

def _reference_pgd(model, x, y, eps, alpha, steps, gen, start, loss_fn):
    """Madry et al.'s last-iterate PGD exactly as rcomp.train had it before the attack core was shared."""
    def proj(z):
        return torch.max(torch.min(z, x + eps), x - eps).clamp(0.0, 1.0)

    was = model.training
    model.eval()
    if start == "uniform":
        delta = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps
    else:
        delta = 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x_adv = proj(x + delta).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(model(x_adv), y), x_adv)
        x_adv = proj(x_adv.detach() + alpha * grad.sign()).detach()
    model.train(was)
    return x_adv


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.05, 0.1, 8 / 255]), steps=st.integers(1, 4),
       mode=st.sampled_from(["pgd", "trades"]))
def test_training_adversary_is_the_attack_core_and_bit_identical_to_the_old_loop(seed, eps, steps, mode):
    from rcomp.attacks.pgd import PGD
    from rcomp.train.adversarial import AdvConfig, adversarial_examples, training_attack

    model = _net(seed % 3).train()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    cfg = AdvConfig(mode, eps, None, steps).resolved()
    assert isinstance(training_attack(cfg, seed), PGD)
    new = adversarial_examples(model, x, y, cfg, torch.Generator().manual_seed(seed), seed)
    if mode == "pgd":
        def loss_fn(z, t):
            return F.cross_entropy(z, t, reduction="sum")
        start = "uniform"
    else:
        with torch.no_grad():
            p_nat = F.softmax(model.eval()(x), 1)
        model.train()

        def loss_fn(z, _):
            return F.kl_div(F.log_softmax(z, 1), p_nat, reduction="sum")
        start = "gauss"
    old = _reference_pgd(model, x, y, eps, cfg.alpha, steps, torch.Generator().manual_seed(seed), start, loss_fn)
    assert torch.equal(new, old)
    assert model.training  # mode restored
    # and training's PGD is rcomp.attacks' PGD with keep_last on the same random stream
    if mode == "pgd":
        direct = PGD(eps, steps=steps, alpha=cfg.alpha, keep_last=True, seed=0)(
            model, x, y, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(new, direct)


def test_keep_last_differs_from_first_success_only_where_the_model_was_fooled():
    from rcomp.attacks.pgd import PGD

    model = _net(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    best = PGD(0.3, steps=5, seed=4)(model, x, y)
    last = PGD(0.3, steps=5, seed=4, keep_last=True)(model, x, y)
    with torch.no_grad():
        fooled_best = model(best).argmax(1) != y
    same = (best == last).flatten(1).all(1)
    assert same[~fooled_best].all()  # never fooled: both are the last iterate
    assert not same.all()  # some fooled point kept climbing
    assert PGD(0.1, keep_last=True).params()["keep_last"] is True and "keep_last" not in PGD(0.1).params()


def test_attack_generator_override_leaves_own_streams_alone():
    from rcomp.attacks.pgd import PGD

    model = _net(2)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    a = PGD(0.1, steps=2, seed=5)
    first = a(model, x, y)
    a.reset()
    a(model, x, y, generator=torch.Generator().manual_seed(1))
    a.reset()
    assert torch.equal(a(model, x, y), first)


# ---------------------------------------------------------------------------
# one evaluation loop
# ---------------------------------------------------------------------------

def test_clean_accuracy_counts_like_a_plain_loop(digits):
    from rcomp.evaluation.accuracy import batches, clean_accuracy

    model = _net(3)
    with torch.no_grad():
        want = int((model(digits.images[:200]).argmax(1) == digits.labels[:200]).sum())
    assert clean_accuracy(model, batches(digits, range(200), 64)) == (want, 200)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(digits.images[:200], digits.labels[:200]),
                                         batch_size=50)
    assert clean_accuracy(model.train(), loader) == (want, 200)
    assert model.training  # mode kept


def test_evaluate_split_robust_counts_only_clean_correct_points(digits):
    from rcomp.train import TrainConfig, evaluate_split
    from rcomp.train.distributed import DistInfo

    cfg = TrainConfig(batch_size=64).validate()
    res = evaluate_split(_net(4), digits, list(range(128)), cfg, 0.1, 0, DistInfo(), "cpu")
    again = evaluate_split(_net(4), digits, list(range(128)), cfg, 0.1, 0, DistInfo(), "cpu")
    assert res == again and 0 <= res["robust_acc"] <= res["clean_acc"] <= 1
    assert evaluate_split(_net(4), digits, list(range(128)), cfg, None, 0, DistInfo(), "cpu").keys() == {"clean_acc"}


def test_evaluate_split_gives_the_figures_of_the_old_per_batch_loop(digits, trained):
    from rcomp.attacks import make_attack
    from rcomp.seeding import derive_seed
    from rcomp.train import TrainConfig, evaluate_split
    from rcomp.train.distributed import DistInfo

    model, cfg, idx = _from(trained), TrainConfig(batch_size=48, seed=5).validate(), list(range(40, 200))
    correct = robust = 0
    for s in range(0, len(idx), 48):  # the loop evaluate_split had before it used rcomp.evaluation
        x, y = digits.images[idx[s:s + 48]], digits.labels[idx[s:s + 48]]
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        attack = make_attack("pgd", 0.1, steps=10, alpha=0.025, seed=derive_seed(5, 7, 2, s))
        with torch.no_grad():
            robust += int((ok & (model(attack(model, x, y)).argmax(1) == y)).sum())
        correct += int(ok.sum())
    res = evaluate_split(model, digits, idx, cfg, 0.1, 2, DistInfo(), "cpu")
    assert res == {"clean_acc": correct / 160, "robust_acc": robust / 160}
    assert 0 < robust < correct


# ---------------------------------------------------------------------------
# guards: non-finite, collapse
# ---------------------------------------------------------------------------

def _cfg(**kw):
    from rcomp.train import TrainConfig

    return TrainConfig(**{"epochs": 1, "batch_size": 64, "progress": False, **kw})


def test_non_finite_loss_stops_with_exit_1_and_writes_nothing(digits, tmp_path):
    from rcomp.errors import TrainingFailed
    from rcomp.train import finetune

    bad = _Data(digits.images.clone(), digits.labels)
    bad.images[70] = float("nan")  # in the second batch of epoch 2's order or the first's
    state = tmp_path / "s.safetensors"
    with pytest.raises(TrainingFailed) as exc:
        finetune(_net(), bad, _cfg(epochs=2, save_every=1, state_path=state))
    assert exc.value.exit_code == 1
    msg = str(exc.value)
    assert "epoch 1" in msg and "non-finite" in msg and "\n" not in msg
    assert not state.exists()


def test_non_finite_weights_are_caught():
    from rcomp.errors import TrainingFailed
    from rcomp.train.guards import check_finite_weights

    model = _net()
    check_finite_weights(model, 1)
    with torch.no_grad():
        next(model.parameters())[0].view(-1)[0] = float("inf")
    with pytest.raises(TrainingFailed, match="epoch 3"):
        check_finite_weights(model, 3)


def test_collapse_monitor_rules():
    from rcomp.errors import TrainingFailed
    from rcomp.train.guards import CollapseMonitor

    healthy = CollapseMonitor(10, start_acc=0.9)
    for e, (loss, acc) in enumerate([(0.5, 0.85), (0.4, 0.9), (0.399, 0.91)], 1):
        assert healthy.epoch({"epoch": e, "loss": loss, "train_acc": acc}) is None
    healthy.verdict({"epoch": 3, "loss": 0.399, "train_acc": 0.91})
    fell = CollapseMonitor(10, start_acc=0.95)
    assert "at chance" in fell.epoch({"epoch": 1, "loss": 2.29, "train_acc": 0.12})
    with pytest.raises(TrainingFailed, match="collapsed.*--allow-collapse"):
        fell.verdict({"epoch": 1, "loss": 2.29, "train_acc": 0.12})
    scratch = CollapseMonitor(10, start_acc=0.1)  # never learnt, loss still moving: not a collapse
    scratch.epoch({"epoch": 1, "loss": 2.30, "train_acc": 0.11})
    scratch.epoch({"epoch": 2, "loss": 2.20, "train_acc": 0.15})
    scratch.verdict({"epoch": 2, "loss": 2.20, "train_acc": 0.15})
    stuck = CollapseMonitor(10, start_acc=0.1)
    stuck.epoch({"epoch": 1, "loss": 2.3030, "train_acc": 0.1})
    assert "stuck" in (stuck.epoch({"epoch": 2, "loss": 2.3029, "train_acc": 0.2}) or "")
    stuck.verdict({"epoch": 2, "loss": 2.3029, "train_acc": 0.2})  # warned, but it never was above chance


@pytest.fixture(scope="module")
def trained(digits):
    from rcomp.train import finetune

    model, metrics = finetune(_net(), digits, _cfg(epochs=30, optimizer="adam", lr=3e-3))
    assert metrics["final"]["train_acc"] > 0.9
    return model.state_dict()


def _from(state):
    model = _net()
    model.load_state_dict(state)
    return model


def test_trades_collapse_is_detected_and_the_default_beta_avoids_it(digits, trained, capsys):
    from rcomp.errors import TrainingFailed
    from rcomp.train import AdvConfig, finetune

    beta6 = AdvConfig("trades", 0.1, beta=6.0, steps=3)  # the old default: the constant model wins
    with pytest.raises(TrainingFailed, match="collapsed") as exc:
        finetune(_from(trained), digits, _cfg(epochs=3, adv=beta6))
    assert exc.value.exit_code == 1 and "\n" not in str(exc.value)
    assert "at chance" in capsys.readouterr().err  # warned during training
    _, m = finetune(_from(trained), digits, _cfg(epochs=3, adv=beta6, allow_collapse=True))
    assert m["final"]["train_acc"] < 0.19  # opted in: the collapsed model comes back
    capsys.readouterr()
    _, m = finetune(_from(trained), digits, _cfg(epochs=3, adv=AdvConfig("trades", 0.1, steps=3)))
    assert m["final"]["train_acc"] > 0.6
    assert "warning" not in capsys.readouterr().err


def test_trades_beta_warmup_is_linear():
    from rcomp.train.adversarial import AdvConfig, trades_beta

    cfg = AdvConfig("trades", 0.1, beta=6.0, beta_warmup=4)
    assert [trades_beta(cfg, s) for s in range(6)] == [1.5, 3.0, 4.5, 6.0, 6.0, 6.0]
    assert trades_beta(AdvConfig("trades", 0.1, beta=6.0), 0) == 6.0


def test_pgd_train_acc_is_clean_accuracy(digits, trained):
    from rcomp.train import AdvConfig, finetune

    _, m = finetune(_from(trained), digits, _cfg(adv=AdvConfig("pgd", 0.1, steps=3)))
    row = m["final"]
    assert row["train_acc"] > 0.7 and row["train_adv_acc"] < row["train_acc"] - 0.2


# ---------------------------------------------------------------------------
# resume state checked like a checkpoint
# ---------------------------------------------------------------------------

def _state(tmp_path, model=None):
    from rcomp.train.optim import make_optimizer
    from rcomp.train.state import save_state

    model = model or _net()
    opt = make_optimizer(model.parameters(), "sgd", 0.01)
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "s.safetensors"
    save_state(path, model, opt, {"epoch": 1, "history": [{"epoch": 1}], "fingerprint": {}})
    return path


def _header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw, n, json.loads(raw[8:8 + n])


def _rewrite(path, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize("edit,needle", [
    ("flip", "digest"),
    ("epoch", "epoch"),
    ("history", "history"),
    ("version", "version"),
    ("lr", "digest"),
])
def test_corrupt_or_edited_state_is_refused(tmp_path, edit, needle):
    from rcomp.errors import RcompError
    from rcomp.train.state import KEY, load_state

    path = _state(tmp_path)
    raw, n, header = _header(path)
    data = bytearray(raw[8 + n:])
    doc = json.loads(header["__metadata__"][KEY])
    if edit == "flip":
        data[len(data) // 2] ^= 0x01
    elif edit == "epoch":
        doc["epoch"] = -3
    elif edit == "history":
        doc["history"] = []
    elif edit == "lr":
        doc["param_groups"][0]["lr"] = 10.0
    else:
        doc["version"] = 99
    header["__metadata__"][KEY] = json.dumps(doc)
    _rewrite(path, header, bytes(data))
    with pytest.raises(RcompError) as exc:
        load_state(path)
    assert exc.value.exit_code == 2 and needle in str(exc.value) and "\n" not in str(exc.value)


def test_state_of_another_shape_is_refused(tmp_path):
    from rcomp.errors import RcompError
    from rcomp.models.registry import build_model
    from rcomp.train.optim import make_optimizer
    from rcomp.train.state import load_state, restore

    info, tensors = load_state(_state(tmp_path))
    other = build_model("convnet8", 5, (1, 8, 8))
    with pytest.raises(RcompError, match="does not fit this model"):
        restore(other, make_optimizer(other.parameters(), "sgd", 0.01), info, tensors, "s")
    model = _net()
    tensors = dict(tensors)
    key = next(k for k in tensors if k.startswith("optim.") and tensors[k].numel() > 1)
    tensors[key] = torch.zeros(3, 3)
    with pytest.raises(RcompError, match="optimizer buffer"):
        restore(model, make_optimizer(model.parameters(), "sgd", 0.01), info, tensors, "s")


# ---------------------------------------------------------------------------
# step budget
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [1, 5, 9])
def test_step_budget_stops_at_exactly_that_many_steps(digits, budget, monkeypatch):
    from rcomp.train import finetune, loop

    calls = []
    real = loop.batch_loss
    monkeypatch.setattr(loop, "batch_loss", lambda *a: calls.append(1) or real(*a))
    _, m = finetune(_net(), digits, _cfg(max_steps=budget))  # 4 steps an epoch
    assert m["steps"] == len(calls) == budget
    assert len(m["epochs"]) == -(-budget // 4) and m["wall_seconds"] > 0


def test_steps_and_wall_time_recorded_without_budget(digits):
    from rcomp.errors import RcompError
    from rcomp.train import finetune

    _, m = finetune(_net(), digits, _cfg(epochs=2))
    assert m["steps"] == 8 and m["wall_seconds"] >= sum(m["epoch_seconds"]) * 0.99
    for bad in (0, -1, True, 2.5):
        with pytest.raises(RcompError, match="--steps-budget"):
            _cfg(max_steps=bad).validate()
