"""Robustness-aware pruning (issue 17): adversarial Taylor and HYDRA-style learned channel scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rcomp.errors import RcompError
from rcomp.models.loading import load, save
from rcomp.models.registry import build_model
from rcomp.pruning import prune


def _two_channel_model():
    """A classifier whose first layer has two channels: A (index 0) reads an input plane that carries no
    label signal, with large weights (so L1 keeps it); B (index 1) reads the plane that decides the label,
    with small weights. Pruning half the channels must keep B."""
    torch.manual_seed(0)
    model = build_model("convnet8", num_classes=2, input_shape=(2, 4, 4))
    net = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[0, 0] = 12.0  # channel A: big weight on the noise plane, same vote for both classes
        net[0].weight[1, 1] = 1.0   # channel B: small weight on the signal plane
        net[4].weight.copy_(torch.tensor([[0.02, -4.0], [0.02, 4.0]]))
        net[4].bias.copy_(torch.tensor([2.0, -2.0]))
    model.net = net.eval()
    return model


def _batches(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.empty(n, 2, 4, 4)
    x[:, 0] = torch.rand(n, 4, 4, generator=g)                 # noise, unrelated to the label
    x[:, 1] = (0.25 + 0.5 * y.float()).view(n, 1, 1)            # 0.25 for class 0, 0.75 for class 1
    return [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])]


def _kept_channel(model) -> int:
    w = model.net[0].weight
    assert w.shape[0] == 1
    return int(w[0].abs().flatten(1).sum(1).argmax())  # the input plane the survivor reads


def test_l1_keeps_the_useless_channel_on_this_model():
    model, _ = prune(_two_channel_model(), 0.5, method="l1")
    assert _kept_channel(model) == 0  # the construction fools weight magnitude


@pytest.mark.parametrize("method", ["taylor", "hydra"])
def test_adversarial_importance_keeps_the_relevant_channel(method):
    model = _two_channel_model()
    clean = model.eval()(_batches()[0][0]).argmax(1).eq(_batches()[0][1]).float().mean()
    assert clean == 1.0
    model, rep = prune(model, 0.5, method=method, batches=_batches(), adv_eps=0.1, adv_steps=3, score_steps=30)
    assert _kept_channel(model) == 1
    assert rep.adversarial["eps"] == 0.1
    assert model.meta.compression["pruning"]["adversarial"]["attack"] == "pgd"


def test_hydra_scores_rank_signal_channel_higher():
    from rcomp.pruning.robust import learn_channel_scores

    model = _two_channel_model()
    scores = learn_channel_scores(model.net, model.normalize, _batches(), keep=0.5, skip=["4"], eps=0.1,
                                  attack_steps=3, steps=30)
    s = scores[model.net[0]]
    assert s[1] > s[0]
    assert not any(p.grad is not None for p in model.net.parameters())  # weights untouched
    assert all(p.requires_grad for p in model.net.parameters())


@pytest.mark.parametrize("method", ["taylor", "hydra"])
def test_robust_pruned_checkpoint_reloads_bit_identically(tmp_path, method):
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", num_classes=10, input_shape=(3, 8, 8)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))]
    model, rep = prune(model, 0.5, method=method, batches=batches, adv_eps=8 / 255, adv_steps=2, score_steps=3,
                       iterative=2)
    assert 0.3 <= rep.ratio_reached <= 0.7
    save(model, tmp_path / "p.safetensors")
    again = load(tmp_path / "p.safetensors")
    x = torch.rand(3, 3, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))
    assert again.meta.compression["pruning"]["method"] == method


@pytest.mark.parametrize(("kw", "needle"), [
    ({"method": "hydra"}, "--adv-eps"),
    ({"method": "l1", "adv_eps": 0.1}, "taylor or hydra"),
    ({"method": "taylor", "adv_eps": 2.0}, "(0, 1]"),
    ({"method": "hydra", "adv_eps": 0.1, "score_steps": 0}, "--score-steps"),
    ({"method": "taylor", "adv_eps": 0.1, "adv_steps": True}, "--adv-steps"),
])
def test_bad_adversarial_options_refused(kw, needle):
    with pytest.raises(RcompError) as err:
        prune(_two_channel_model(), 0.5, batches=_batches(), **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_hydra_needs_data():
    with pytest.raises(RcompError, match="--data"):
        prune(_two_channel_model(), 0.5, method="hydra", adv_eps=0.1)


def test_shufflenet_names_the_blocking_operation():
    """torch-pruning 1.6.1 cannot follow channels through ShuffleNetV2's channel_shuffle (issue 16)."""
    model = build_model("shufflenet_v2_x1_0", num_classes=10, input_shape=(3, 32, 32)).eval()
    with pytest.raises(RcompError) as err:
        prune(model, 0.5)
    msg = str(err.value)
    assert "channel_shuffle" in msg and "no --ignore" in msg and "\n" not in msg
    assert "integer division" not in msg
