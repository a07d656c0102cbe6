"""Channels-last weights while evaluating (rcomp.models.layout): faster, invisible to the caller, and never
at the cost of a network that needs contiguous activations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rcomp.attacks import make_attack
from rcomp.evaluation.robustness import evaluate
from rcomp.models.layout import fast_layout


@pytest.fixture(scope="module")
def digits_loader(digits_model):
    from rcomp.data.registry import get_dataset, make_loader

    return make_loader(get_dataset("digits", "test", digits_model.meta.input), 64, n=128)


def _strides(model):
    return {k: t.stride() for k, t in [*model.named_parameters(), *model.named_buffers()]}


def _conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_inside_the_block_every_conv_weight_is_channels_last_and_after_it_as_before(digits_model):
    model = copy.deepcopy(digits_model)
    before = _strides(model)
    values = {k: t.clone() for k, t in model.state_dict().items()}
    with fast_layout(model):
        convs = _conv_weights(model)
        # the first convolution has one input channel: contiguous in both layouts, restrided anyway
        assert all(w.stride()[1] == 1 for w in convs), [w.stride() for w in convs]
        assert _strides(model) != before
    assert _strides(model) == before
    assert all(torch.equal(values[k], t) for k, t in model.state_dict().items())


def test_restored_after_an_exception_and_a_no_op_off_cpu(digits_model):
    model = copy.deepcopy(digits_model)
    before = _strides(model)
    with pytest.raises(RuntimeError, match="boom"), fast_layout(model):
        raise RuntimeError("boom")
    assert _strides(model) == before
    with fast_layout(model, device="cuda"):  # only the device's type is read: no GPU needed
        assert _strides(model) == before


def test_evaluate_leaves_the_callers_model_as_it_came_and_matches_plain_attacks(digits_model, digits_loader):
    model = copy.deepcopy(digits_model)
    before = _strides(model)
    pgd = make_attack("pgd", 0.1, steps=5, seed=3)
    res = evaluate(model, digits_loader, {"pgd": pgd}, progress=False)
    assert _strides(model) == before
    # the same attack on the same batches without the layout: same figure (the layout orders the arithmetic
    # differently; on these points no decision flips)
    pgd.reset()
    robust = total = 0
    for x, y in digits_loader:
        adv = pgd(model, x, y)
        with torch.no_grad():
            robust += int(((model(adv).argmax(1) == y) & (model(x).argmax(1) == y)).sum())
        total += len(y)
    assert res.robust_acc["pgd"] == pytest.approx(robust / total)


class _Viewing(nn.Module):
    """Old-style network: ``.view`` on conv activations, which needs them contiguous."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def test_a_network_that_needs_contiguous_activations_keeps_its_layout():
    net = _Viewing().eval()
    x = torch.rand(2, 1, 8, 8)
    with fast_layout(net), pytest.raises(RuntimeError):  # what the probe protects against
        net(x)
    before = _strides(net)
    with fast_layout(net, probe=lambda: net(x)):
        assert _strides(net) == before  # refused: nothing changed
        net(x)
    assert _strides(net) == before


def test_a_traced_network_refused_by_the_probe_prints_nothing(capfd):
    """torch.fx prints a traced forward's failure to stderr itself: every load of a quantized twin of such a
    network (a torch.fx GraphModule) showed a Python traceback although rcomp recovered."""
    net = torch.fx.symbolic_trace(_Viewing().eval())
    x = torch.rand(2, 1, 8, 8)
    before = _strides(net)
    with fast_layout(net, probe=lambda: net(x)):
        assert _strides(net) == before
    err = capfd.readouterr().err
    assert "Traceback" not in err and "FX-traced" not in err


def test_evaluate_runs_a_viewing_network(digits_loader):
    from rcomp.io.format import ArchSpec, CheckpointMeta, InputSpec
    from rcomp.models.wrapper import Classifier

    torch.manual_seed(0)
    meta = CheckpointMeta(arch=ArchSpec(name="viewing"), input=InputSpec(channels=1, height=8, width=8, mean=[0.0],
                                                                         std=[1.0]),
                          num_classes=10)
    model = Classifier(_Viewing(), meta).eval()
    res = evaluate(model, digits_loader, {"pgd": make_attack("pgd", 0.1, steps=2, seed=0)}, progress=False)
    assert res.n == 128 and 0.0 <= res.robust_acc["pgd"] <= res.clean_acc
