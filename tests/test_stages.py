"""The stage layer: the CLI, recipes and the Python API are one code path."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _stage_recipe(tmp_path, command, options, inp) -> Path:
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "same", "stages": [
        {"name": "s", "command": command, "input": str(inp), "options": options}]}))
    return recipe


@pytest.mark.parametrize("command,options,flags", [
    ("prune", {"ratio": 0.5, "method": "l2", "seed": 3}, ["--ratio", "0.5", "--method", "l2", "--seed", "3"]),
    ("quantize", {"simulate": True, "bits": 4, "data": "digits", "calib-n": 32, "eval_n": 16},
     ["--simulate", "--bits", "4", "--data", "digits", "--calib-n", "32", "--eval-n", "16"]),
])
def test_recipe_stage_and_cli_write_the_same_bytes(cli, trained_digits, tmp_path, command, options, flags):
    out_cli = tmp_path / "cli.safetensors"
    res = cli(command, trained_digits, *flags, "-o", out_cli)
    assert res.code == 0, res.stderr
    res = cli("run", _stage_recipe(tmp_path, command, options, trained_digits), "--out-dir", tmp_path / "run")
    assert res.code == 0, res.stderr
    assert (tmp_path / "run" / "s.safetensors").read_bytes() == out_cli.read_bytes()


def test_recipe_engine_builds_no_argument_lists():
    src = (Path(__file__).resolve().parent.parent / "rcomp" / "recipes" / "engine.py").read_text()
    assert "rcomp.cli" not in src and "redirect_stdout" not in src and "main(" not in src


def test_readme_notebook_chain_runs_and_records_every_stage(tmp_path, monkeypatch):
    block = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(textwrap.dedent(block), "README.md", "exec"), namespace)
    import rcomp

    saved = rcomp.load(tmp_path / "robust.safetensors")
    res = namespace["res"]  # the Result of the stage that wrote it (output=)
    assert res.path == Path("robust.safetensors") and res.report["sha256"] == saved.source_sha256
    hist = saved.meta.history
    assert [h["command"] for h in hist] == ["finetune", "prune", "finetune"]
    assert hist[1]["params"]["ratio"] == 0.5 and hist[2]["params"]["adv"] == "pgd"
    assert hist[2]["params"]["eps"] == pytest.approx(0.1)
    assert 0 <= namespace["report"]["worst_case_acc"] <= namespace["report"]["clean_acc"] <= 1
    # the original model is kept and benchmarked beside the compressed ones (issue 26)
    dense, rows = namespace["dense"], namespace["table"]["models"]
    assert [h["command"] for h in dense.meta.history] == ["finetune"]
    assert [r["name"] for r in rows] == ["convnet8 finetune[0]", "convnet8 prune", "convnet8 finetune[2]",
                                         "convnet8 quantize"]
    assert rows[0]["params"] == sum(p.numel() for p in dense.parameters()) > rows[1]["params"] == rows[2]["params"]
    assert rows[0]["clean_acc"] > 0.8 and sum(namespace["table"]["points"]["per_class"]) == 100


def test_api_refuses_bad_values_like_the_cli():
    import rcomp

    with pytest.raises(rcomp.RcompError, match="--ratio"):
        rcomp.prune("nowhere.safetensors", ratio=50)
    with pytest.raises(rcomp.RcompError, match="command prune has no option --ratoi"):
        rcomp.prune("nowhere.safetensors", ratoi=0.5)


def test_dir_lists_the_stage_functions():
    import rcomp

    assert {"prune", "quantize", "finetune", "attack", "bench", "convert"} <= set(dir(rcomp))


@pytest.mark.parametrize("args", [
    ["prune", "x.safetensors", "--ratio", "50"],
    ["attack", "x.safetensors", "--eps", "2", "--attack", "pgd", "--data", "digits"],
    ["finetune", "--arch", "convnet8", "--momentum", "nan"],
    ["finetune", "--arch", "convnet8", "--steps", "1000000000"],
    ["prune", "x.safetensors", "--ratio", "0.5", "--iterative", "100000000"],
])
def test_bad_values_are_refused_before_torch_is_imported(args):
    code = (
        "import sys\n"
        "from rcomp.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as e:\n"
        "    print('EXIT', e.code, file=sys.stderr)\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "EXIT 2" in res.stderr and "TORCH False" in res.stderr, res.stderr
    assert res.stderr.count("rcomp: error:") == 1
