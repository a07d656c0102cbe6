"""--config files and recipes take every option by its command-line name (dashes or underscores), except
the command-line-only ones, which they refuse saying why: checked over the whole stage table."""

from __future__ import annotations

import pytest
import yaml

from rcomp.errors import RcompError
from rcomp.options import make_config, options_of
from rcomp.stages import STAGES, get_stage

from conftest import assert_one_line_error

SAMPLES = {"choice": None, "int": 1, "float": 0.5, "number": 0.5, "eps": "8/255", "eps_list": "8/255",
           "fraction": 0.5, "bool": True, "path": "some/file", "shape": [1, 8, 8], "floats": [0.5], "ints": [3, 9],
           "json": {"width": 8}, "names": None, "str": "digits", "repeat": ["a=1"]}


def _sample(o):
    if o.choices:
        return [o.choices[0]] if o.kind == "names" else o.choices[-1]
    if o.kind == "names":
        return ["layer1"]
    v = SAMPLES[o.kind]
    if o.kind in ("int", "float", "number") and o.min is not None:
        v = max(v, o.min + (1 if o.min_open else 0))
    return v


def _cases():
    for stage in STAGES:
        for o in options_of(get_stage(stage).config):
            yield pytest.param(stage, o, id=f"{stage}-{o.key}")


@pytest.mark.parametrize("stage,o", list(_cases()))
def test_every_option_by_its_cli_name(stage, o):
    cls = get_stage(stage).config
    value = _sample(o)
    for key in (o.key, o.key.replace("-", "_")):
        if o.file_ok and o.file_check is None:
            got = make_config(cls, from_file={key: value}, file_source="c.yaml", command=stage, partial=True)
            assert got[o.name] == o.parse(value)
        elif not o.file_ok:
            with pytest.raises(RcompError, match="only be given on the command line"):
                make_config(cls, from_file={key: value}, file_source="c.yaml", command=stage, partial=True)


@pytest.mark.parametrize("stage", STAGES)
def test_user_factories_and_trust_never_come_from_files(stage):
    cls = get_stage(stage).config
    keys = {o.key: o for o in options_of(cls)}
    for key in ("force", "trust-factory"):
        if key in keys:
            assert not keys[key].file_ok
    if "arch" in keys:
        with pytest.raises(RcompError, match="user factory runs code"):
            make_config(cls, from_file={"arch": "os:system"}, command=stage, partial=True)
        make_config(cls, from_file={"arch": "convnet8"}, command=stage, partial=True)


def test_unknown_key_names_the_file_and_option():
    with pytest.raises(RcompError, match=r"c\.yaml: command prune has no option --ratoi"):
        make_config(get_stage("prune").config, from_file={"ratoi": 0.5}, file_source="c.yaml", command="prune")


def test_command_line_wins_over_the_file():
    cfg = make_config(get_stage("prune").config, {"ratio": "0.3"}, from_file={"ratio": 0.5}, command="prune")
    assert cfg.ratio == 0.3


# ----- end to end, through the CLI ------------------------------------------------------

def _config(tmp_path, doc) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def test_bench_takes_attack_and_format_from_config(cli, tiny_ckpt, tmp_path):
    conf = _config(tmp_path, {"bench": {"attack": "pgd", "eps": 0.1, "steps": 2, "data": "digits", "n": 8,
                                        "json": True, "latency-batch": 0}})
    res = cli("bench", tiny_ckpt, "--config", conf, "--device", "cpu")
    assert res.code == 0, res.stderr
    import json

    out = json.loads(res.stdout)
    assert list(out["attacks"]) == ["pgd"] and out["attacks"]["pgd"]["steps"] == 2


def test_json_true_in_config(cli, tiny_ckpt, tmp_path):
    conf = _config(tmp_path, {"json": True, "ratio": 0.5})
    res = cli("prune", tiny_ckpt, "--config", conf, "-o", tmp_path / "p.safetensors")
    assert res.code == 0, res.stderr
    assert '"sha256"' in res.stdout


@pytest.mark.parametrize("doc,needle", [
    ({"trust-factory": True, "ratio": 0.5}, "--trust-factory may only be given on the command line"),
    ({"force": True, "ratio": 0.5}, "--force may only be given on the command line"),
    ({"arch": "os:system", "ratio": 0.5}, "user factory runs code"),
    ({"ratio": 50}, "--ratio"),
])
def test_config_refusals_are_one_line(cli, tiny_ckpt, tmp_path, doc, needle):
    marker = tmp_path / "ran"
    res = cli("prune", tiny_ckpt, "--config", _config(tmp_path, doc), "-o", tmp_path / "p.safetensors")
    assert_one_line_error(res, needle)
    assert not (tmp_path / "p.safetensors").exists() and not marker.exists()
