"""The catalogue mechanism and typed option values: eps parsed once into floats that keep their text,
entries that refuse what they do not take, names that must exist."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rcomp.catalog import Catalogue, Entry
from rcomp.errors import RcompError
from rcomp.options import config_dict, make_config, to_args
from rcomp.parsing import Eps, eps_text, parse_eps, parse_eps_list


@given(st.lists(st.tuples(st.integers(0, 255), st.sampled_from([255, 256, 1000])), min_size=1, max_size=4))
def test_eps_list_is_floats_that_keep_their_text(pairs):
    texts = [f"{a}/{b}" for a, b in pairs]
    vals = parse_eps_list(",".join(texts))
    assert [float(v) for v in vals] == [parse_eps(t) for t in texts]  # the same numbers as before
    assert [str(v) for v in vals] == texts and [eps_text(v) for v in vals] == texts  # keys read as typed
    assert all(isinstance(v, float) for v in vals)
    assert json.loads(json.dumps(list(vals))) == [float(v) for v in vals]  # JSON sees numbers


def test_eps_from_the_attack_config_is_typed_and_fingerprints_keep_the_text():
    from rcomp.stages.attack import Config

    cfg = make_config(Config, {"data": "digits", "attack": "pgd", "eps": "2/255, 0.1"}, command="attack")
    assert cfg.eps == (2 / 255, 0.1) and all(type(e) is Eps for e in cfg.eps)
    assert config_dict(cfg)["eps"] == ["2/255", "0.1"]  # recipe fingerprints as before the change
    assert to_args(cfg)[to_args(cfg).index("--eps") + 1] == "2/255,0.1"
    from_yaml = make_config(Config, from_file={"data": "digits", "attack": "pgd", "eps": [0.1, "8/255"]},
                            command="attack")
    assert [str(e) for e in from_yaml.eps] == ["0.1", "8/255"]
    with pytest.raises(RcompError, match="outside"):
        make_config(Config, {"data": "digits", "attack": "pgd", "eps": "2"}, command="attack")


def test_build_attacks_takes_numbers_only():
    from rcomp.evaluation.bench import attack_key, build_attacks

    with pytest.raises(RcompError, match="parse text once"):
        build_attacks(["pgd"], ["8/255"])
    assert attack_key("pgd", Eps(8 / 255, "8/255"), True) == "pgd@8/255"
    assert attack_key("pgd", 0.1, True) == "pgd@0.1" and attack_key("pgd", 0.1, False) == "pgd"


def test_a_catalogue_refuses_a_second_entry_of_a_name_and_suggests_close_ones():
    with pytest.raises(ValueError, match="twice"):
        Catalogue("thing", [Entry("a", "m:a"), Entry("a", "m:b")])
    cat = Catalogue("thing", [Entry("alpha", "m:a"), Entry("beta", "m:b")], flag="--thing")
    assert "alpha" in cat and "gamma" not in cat and cat.builtin_names() == ("alpha", "beta")
    with pytest.raises(RcompError, match=r"unknown thing 'alpah' \(did you mean alpha\?\); --thing takes one of"):
        cat.get("alpah")
    assert cat.help_names() == "alpha or beta"


def test_every_attack_refuses_each_option_it_does_not_take():
    """Derived from the catalogue: each (attack, option not taken) pair is refused in one line, and left out
    when several attacks share the options."""
    from rcomp.attacks import make_attack, taken_options
    from rcomp.attacks.catalog import ATTACKS, OPTIONS

    values = {"steps": 3, "alpha": 0.01, "random_start": False, "restarts": 2, "loss": "dlr", "targeted": True,
              "queries": 7, "p_init": 0.5, "targets": 2}
    for e in ATTACKS.entries(plugins=False):
        for opt in OPTIONS:
            if opt in e.takes:
                continue
            with pytest.raises(RcompError) as info:
                make_attack(e.name, 0.1, **{opt: values[opt]})
            assert "\n" not in str(info.value)
            assert taken_options(e.name, {opt: values[opt]}, lenient=True) == {}
    assert taken_options("pgd", {"steps": 3, "queries": 7}, lenient=True) == {"steps": 3}


def test_unknown_importance_is_refused_not_taylor():
    import torch

    from rcomp.models.registry import build_model
    from rcomp.pruning import prune

    torch.manual_seed(0)
    with pytest.raises(RcompError, match="unknown importance 'taylr'.*did you mean taylor"):
        prune(build_model("convnet8", 10, (1, 8, 8)), 0.5, method="taylr")


def test_quantization_modes_come_from_one_place():
    from rcomp.quant import catalog as qc

    assert qc.mode_for(False) == "int8" and qc.mode_for(True) == "simulated"
    assert qc.is_real({"mode": "int8"}) and not qc.is_real({"mode": "simulated"}) and not qc.is_real("int4")
    assert qc.label({"mode": "simulated", "bits": 4}) == "sim4"
    assert qc.label({"mode": "int8", "bits": 8, "backend": "x86"}) == "int8 x86" and qc.label(None) == "-"
    assert qc.bits_of("simulated") == tuple(range(2, 17)) and qc.bits_of("int8") == (8,)
