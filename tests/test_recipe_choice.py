"""Recipe inputs chosen at run time: ``{best: [A, B], by: BENCH}`` takes the candidate with the higher worst
case in BENCH's JSON (issue 25: the demo judges with auto only the better of each path's two methods)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rcomp.errors import RcompError
from rcomp.recipes.choice import Choice, pick

from conftest import assert_one_line_error, make_checkpoint


def _doc(good: Path, bad: Path, **judge) -> dict:
    """Two candidates (a trained and a random convnet8, each pruned a little), a PGD bench of both, and a bench
    of the better one."""
    return {"name": "choose", "defaults": {"data": "digits", "seed": 0}, "stages": [
        {"name": "good", "command": "prune", "input": str(good), "options": {"ratio": 0.25}},
        {"name": "bad", "command": "prune", "input": str(bad), "options": {"ratio": 0.25}},
        {"name": "bench", "command": "bench", "inputs": ["bad", "good"],
         "options": {"attack": "fgsm", "eps": 0.02, "n": 32, "latency-batch": 0, "format": "json"},
         "output": "bench.json"},
        {"name": "judge", "command": "bench",
         "inputs": judge.get("inputs", [{"best": ["bad", "good"], "by": "bench"}]),
         "options": {"attack": "pgd", "eps": 0.02, "n": 32, "latency-batch": 0, "format": "json"},
         "output": "judge.json"},
    ]}


def _write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture
def candidates(tmp_path, trained_digits) -> tuple[Path, Path]:
    return Path(trained_digits), make_checkpoint(tmp_path / "random.safetensors")


def test_the_more_robust_candidate_is_judged_and_the_choice_is_said(tmp_path, candidates, cli):
    recipe = _write(tmp_path, _doc(*candidates))
    out = tmp_path / "out"
    res = cli("run", recipe, "--out-dir", out, "--json")
    assert res.code == 0, res.stderr[-3000:]
    bench = {Path(m["path"]).stem: m["worst_case_acc"] for m in json.loads((out / "bench.json").read_text())["models"]}
    assert bench["good"] > bench["bad"]
    judged = [Path(m["path"]).stem for m in json.loads((out / "judge.json").read_text())["models"]]
    assert judged == ["good"]
    record = {s["stage"]: s for s in json.loads(res.stdout)["stages"]}["judge"]  # the run records the choice
    assert record["choices"] == [{"by": "bench", "chosen": "good", "figures": {"bad": bench["bad"], "good": bench["good"]}}]
    assert f"judge: best of bad {bench['bad']:.4f}, good {bench['good']:.4f} by stage bench's worst case (fgsm): good" \
        in res.stderr
    # a rerun skips it (the same choice); bench figures that flip the choice rerun it on the other model
    again = cli("run", recipe, "--out-dir", out, "--json")
    assert [s["status"] for s in json.loads(again.stdout)["stages"]] == ["skipped"] * 4
    data = json.loads((out / "bench.json").read_text())
    for m in data["models"]:
        m["worst_case_acc"] = 1.0 if Path(m["path"]).stem == "bad" else 0.0
    (out / "bench.json").write_text(json.dumps(data))
    stamp = out / ".rcomp-run" / "bench.json"  # the bench counts as done with these figures
    from rcomp.io.header import sha256_file

    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "output_sha256": sha256_file(out / "bench.json")}))
    res = cli("run", recipe, "--out-dir", out, "--json")
    assert res.code == 0, res.stderr[-2000:]
    assert [s["status"] for s in json.loads(res.stdout)["stages"]] == ["skipped"] * 3 + ["ran"]
    assert [Path(m["path"]).stem for m in json.loads((out / "judge.json").read_text())["models"]] == ["bad"]


def test_dry_run_shows_what_is_chosen_among(tmp_path, candidates, cli):
    res = cli("run", _write(tmp_path, _doc(*candidates)), "--out-dir", tmp_path / "o", "--dry-run")
    assert res.code == 0, res.stderr
    assert "'best-of(bad|good;by=bench)'" in res.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("inputs,needle", [
    ([{"best": ["bad", "good"]}], "it needs both best: and by:"),
    ([{"best": ["bad", "good"], "by": "bench", "pick": "max"}], "unknown key 'pick'"),
    ([{"best": [], "by": "bench"}], "best: is a list of stage names"),
    ([{"best": ["bad", "nope"], "by": "bench"}], "best: 'nope' is not a stage name"),
    ([{"best": ["bad", "good"], "by": "nope"}], "by: 'nope' is not a stage name"),
    ([{"best": ["bad", "good"], "by": "good"}], "by: 'good' must be a bench stage with format: json"),
    ([{"best": ["bad", "judge"], "by": "bench"}], "takes its own output as input"),
])
def test_bad_choices_are_refused_before_anything_runs(tmp_path, candidates, cli, inputs, needle):
    out = tmp_path / "out"
    res = cli("run", _write(tmp_path, _doc(*candidates, inputs=inputs)), "--out-dir", out)
    assert_one_line_error(res, needle)
    assert not out.exists()


def test_a_bench_that_does_not_measure_a_candidate_is_refused(tmp_path, candidates, cli):
    doc = _doc(*candidates)
    doc["stages"][2]["inputs"] = ["bad"]
    res = cli("run", _write(tmp_path, doc), "--out-dir", tmp_path / "out")
    assert_one_line_error(res, "bench stage 'bench' does not measure 'good'")
    doc["stages"][2]["inputs"] = ["bad", "good"]
    doc["stages"][2]["options"]["format"] = "table"
    res = cli("run", _write(tmp_path, doc), "--out-dir", tmp_path / "out")
    assert_one_line_error(res, "must be a bench stage with format: json")


def _bench_json(tmp_path: Path, scores: dict[str, float | None], **extra) -> tuple[Choice, list[Path]]:
    files = []
    for name in scores:
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(name.encode())
        files.append(f)
    from rcomp.io.header import sha256_file

    rows = [{"path": str(f), "sha256": sha256_file(f), "worst_case_acc": s, **extra}
            for f, s in zip(files, scores.values(), strict=True) if s is not None]
    (tmp_path / "b.json").write_text(json.dumps({"attacks": {"pgd": {}}, "models": rows}))
    ch = Choice(best=list(scores), by="b", names=list(scores), paths=[str(f) for f in files],
                by_output=str(tmp_path / "b.json"))
    return ch, files


def test_pick_takes_the_highest_and_the_first_of_equals(tmp_path):
    said = []
    ch, files = _bench_json(tmp_path, {"a": 0.5, "b": 0.7, "c": 0.7})
    assert pick(ch, "here", said.append) == (str(files[1]), {"by": "b", "chosen": "b",
                                                             "figures": {"a": 0.5, "b": 0.7, "c": 0.7}})
    assert said == ["best of a 0.5000, b 0.7000, c 0.7000 by stage b's worst case (pgd): b"]


@pytest.mark.parametrize("case,needle", [
    ("missing", "has no figure for 'b'"),
    ("stale", "older version of its file"),
    ("garbage", "is not a bench JSON"),
    ("not-a-number", "has no figure for 'a'"),
])
def test_pick_refuses_a_bench_output_it_cannot_trust(tmp_path, case, needle):
    ch, files = _bench_json(tmp_path, {"a": 0.5, "b": None if case == "missing" else 0.7})
    if case == "stale":
        files[1].write_bytes(b"changed since the bench")
    if case == "garbage":
        (tmp_path / "b.json").write_text("{not json")
    if case == "not-a-number":
        data = json.loads((tmp_path / "b.json").read_text())
        data["models"][0]["worst_case_acc"] = "high"
        (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(RcompError, match=needle):
        pick(ch, "here", lambda _: None)


def test_a_dropped_candidate_drops_the_stage_that_chooses_among_it(tmp_path, candidates):
    from rcomp.recipes.engine import Recipe

    r = Recipe(yaml.safe_dump(_doc(*candidates)), source="r.yaml")
    assert r.without(["good"]) == ["good", "bench", "judge"]
