"""The Python API refuses bad option values with RcompError (the CLI's one line), never a raw
ValueError/OverflowError/TypeError from deep inside (issue 22): one case per kind of bad value."""

from __future__ import annotations

import pytest

import rcomp
from rcomp.errors import RcompError

BAD = [
    ("prune", dict(ratio=float("nan")), "not a finite number"),
    ("prune", dict(ratio=1e309), "not a finite number"),
    ("prune", dict(ratio="abc"), "not a number"),
    ("prune", dict(ratio=[1]), "not a number"),
    ("prune", dict(ratio=0.5, seed=2**80), "--seed"),
    ("prune", dict(ratio=0.5, method="nope"), "unknown method"),
    ("prune", dict(ratio=0.5, bogus=1), "no option --bogus"),
    ("quantize", dict(bits=99, simulate=True), "--bits 99"),
    ("quantize", dict(bits=float("inf"), simulate=True), "not an integer"),
    ("attack", dict(data="digits", eps=float("nan")), "not a finite number"),
    ("attack", dict(data="digits", eps=-1), "outside [0, 1]"),
    ("attack", dict(data="digits", eps=0.1, n=10**30), "out of range"),
    ("attack", dict(data="digits", eps=0.1, steps=1e20), "out of range"),
    ("attack", dict(data="digits", eps=0.1, attack="nope"), "unknown attack"),
    ("finetune", dict(data="digits", epochs=float("nan")), "not an integer"),
    ("finetune", dict(data="digits", lr=float("inf")), "not a finite number"),
    ("finetune", dict(data="digits", epochs=10**30), "out of range"),
    ("finetune", dict(data="nope"), "unknown dataset"),
    ("bench", dict(data="digits", eps=[0.1, "x"]), "not a number"),
]


@pytest.fixture(scope="module")
def net():
    return rcomp.build_model("mlp", num_classes=10, input_shape=(1, 8, 8))


@pytest.mark.parametrize("fn,options,needle", BAD, ids=[f"{f}-{'-'.join(o)}-{i}" for i, (f, o, _) in enumerate(BAD)])
def test_api_refuses_bad_values_with_rcomp_error(net, fn, options, needle):
    import torch

    before = {k: v.clone() for k, v in net.state_dict().items()}
    call = getattr(rcomp, fn)
    with pytest.raises(RcompError) as info:
        call([net], log=lambda *a, **k: None, **options) if fn == "bench" else call(net, log=lambda *a, **k: None,
                                                                                      **options)
    assert needle.lower() in str(info.value).lower(), str(info.value)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing touched the model
