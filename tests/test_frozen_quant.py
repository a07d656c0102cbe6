"""Fake-quant networks rounded once while evaluated (rcomp.quant.frozen): bit-identical outputs and input
gradients, every module back in place after (also after an exception), observing quantizers left alone."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from rcomp.attacks import make_attack
from rcomp.quant.frozen import frozen_quantizers


@pytest.fixture(scope="module")
def batch(digits_model):
    from rcomp.data.registry import get_dataset
    from rcomp.evaluation.accuracy import fetch

    return fetch(get_dataset("digits", "test", digits_model.meta.input), range(96))


@pytest.fixture(scope="module", params=["int8", "int4-simulated"])
def quantized(request, digits_model, batch):
    from rcomp.quant.ptq import quantize

    x, _ = batch
    return quantize(digits_model, [x[:64]], bits=8) if request.param == "int8" else \
        quantize(digits_model, [x[:64]], bits=4, simulate=True)


def _modules(m):
    return {name: mod for name, mod in m.named_modules()}


def _out_and_grad(net, x):
    x = x.clone().requires_grad_(True)
    out = net(x)
    (g,) = torch.autograd.grad(out.logsumexp(1).sum(), x)
    return out.detach(), g


def test_outputs_and_input_gradients_are_bit_identical_and_the_modules_come_back(quantized, batch):
    x, _ = batch
    twin = quantized.gradient_model()
    before = _modules(twin)
    plain = _out_and_grad(twin, x)
    with frozen_quantizers(quantized, twin):
        swapped = [n for n, m in twin.named_modules() if type(m).__name__ in ("_Rounded", "_PerTensor")]
        inside = _out_and_grad(twin, x)
    assert len(swapped) >= 10  # convnet8: 8 weight quantizers, 10 activation ones
    assert all(torch.equal(a, b) for a, b in zip(plain, inside, strict=True))
    assert _modules(twin) == before  # the same module objects, in the same places


def test_restored_after_an_exception(quantized):
    twin = quantized.gradient_model()
    before = _modules(twin)
    with pytest.raises(RuntimeError, match="boom"), frozen_quantizers(twin):
        raise RuntimeError("boom")
    assert _modules(twin) == before


def test_quantizers_that_still_observe_are_left_alone(quantized):
    from rcomp.quant.qat import to_trainable

    trainable = to_trainable(quantized).train()  # weight observers on while training
    weight_q = {n for n, m in trainable.named_modules() if n.endswith("weight_fake_quant")}
    with frozen_quantizers(trainable):
        assert {n for n, m in trainable.named_modules() if n.endswith("weight_fake_quant")
                and type(m).__name__ == "_Rounded"} == set()
    assert weight_q


def test_attacks_through_evaluate_are_those_without_it(quantized, batch, monkeypatch):
    """The real code path: evaluate (which enters frozen_quantizers) gives the figures it gave without."""
    import rcomp.quant.frozen as frozen
    from rcomp.evaluation.robustness import evaluate

    x, y = batch
    loader = [(x[i:i + 48], y[i:i + 48]) for i in (0, 48)]
    attacks = {"pgd": make_attack("pgd", 0.1, steps=5, seed=1), "apgd-t": make_attack("apgd-t", 0.1, steps=10, seed=1)}
    on = evaluate(copy.deepcopy(quantized), loader, copy.deepcopy(attacks), progress=False, records="images")
    monkeypatch.setattr(frozen, "frozen_quantizers", lambda *m: contextlib.nullcontext())
    off = evaluate(copy.deepcopy(quantized), loader, copy.deepcopy(attacks), progress=False, records="images")
    assert on.robust_acc == off.robust_acc and on.worst_case_acc == off.worst_case_acc
    assert torch.equal(on.records.stage, off.records.stage) and torch.equal(on.records.adv, off.records.adv)


def test_a_trainable_twin_switches_mode_inside_the_block_and_its_flags_land_on_the_originals(quantized, batch):
    """Validation during quantization-aware fine-tuning: evaluate (frozen) runs attacks whose eval_mode calls
    the trainable model's train(False), which sets every weight quantizer's observer flag."""
    from rcomp.evaluation.robustness import evaluate
    from rcomp.quant.qat import to_trainable

    x, y = batch
    trainable = to_trainable(quantized).train()
    trainable.eval()
    originals = {n: m for n, m in trainable.named_modules() if n.endswith("weight_fake_quant")}
    with frozen_quantizers(trainable):
        trainable.train()  # flags written through the stand-ins, onto the originals
        assert all(bool(m.observer_enabled[0]) for m in originals.values())
        trainable.eval()
    assert all(not bool(m.observer_enabled[0]) for m in originals.values())
    trainable.train()
    res = evaluate(trainable, [(x[:32], y[:32])], {"pgd": make_attack("pgd", 0.1, steps=3, seed=0)}, progress=False)
    assert trainable.training and all(bool(m.observer_enabled[0]) for m in originals.values())
    assert {n: m for n, m in trainable.named_modules() if n.endswith("weight_fake_quant")} == originals
    assert 0.0 <= res.robust_acc["pgd"] <= res.clean_acc


def test_quantization_aware_adversarial_training_rounds_once_per_attack_with_the_same_weights(quantized, batch,
                                                                                              monkeypatch):
    """Training's PGD examples come from Attack.__call__, which rounds the (fixed during the attack) weights once:
    the trained weights are those of rounding on every step, bit for bit, and the attack did swap them."""
    import rcomp.quant.frozen as frozen
    from rcomp.quant.qat import to_trainable

    x, y = batch
    attack = make_attack("pgd", 0.1, steps=4, seed=0)
    seen = []
    real = frozen.frozen_quantizers

    @contextlib.contextmanager
    def spy(*modules):
        with real(*modules):
            seen.append(sum(type(m).__name__ == "_Rounded" for root in modules for m in root.modules()))
            yield

    def train(patch):
        monkeypatch.setattr(frozen, "frozen_quantizers", patch)
        net = to_trainable(quantized).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for i in range(3):
            x_adv = attack(net, x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
            net.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x_adv), y[i * 32:(i + 1) * 32]).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    attack.reset()
    once = train(spy)
    attack.reset()
    every = train(lambda *m: contextlib.nullcontext())
    assert torch.equal(once, every)
    assert len(seen) == 3 and min(seen) >= 8  # each attack rounded convnet8's 8 weights once
