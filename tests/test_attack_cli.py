"""`rcomp attack` and `rcomp bench` end to end through the CLI."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tests.conftest import assert_one_line_error, make_checkpoint


def _json(res):
    assert res.code == 0, res.stderr
    return json.loads(res.stdout)


# ---------------------------------------------------------------------------
# rcomp attack
# ---------------------------------------------------------------------------

def test_attack_report(cli, trained_digits):
    d = _json(cli("attack", trained_digits, "--data", "digits", "-n", "96", "--attack", "fgsm,pgd", "--eps", "0.1",
                  "--json"))
    assert d["n"] == 96 and d["gradient_source"] == "exact" and len(d["sha256"]) == 64
    assert d["clean_acc"] > 0.85
    assert d["robust_acc"]["pgd"] < d["clean_acc"] - 0.2
    assert d["worst_case_acc"] <= min(d["robust_acc"].values())
    pgd = d["attacks"]["pgd"]
    assert pgd["params"]["steps"] == 10 and pgd["params"]["eps"] == 0.1
    assert 0 < pgd["mean_norm"] <= pgd["max_norm"] <= 0.1 + 1e-5
    assert pgd["success_rate"] == pytest.approx(1 - d["robust_acc"]["pgd"] / d["clean_acc"], abs=1e-9)
    assert pgd["examples_per_s"] > 0


def test_attack_human_report_and_eps_sweep(cli, trained_digits):
    res = cli("attack", trained_digits, "--data", "digits", "-n", "64", "--attack", "pgd", "--steps", "3",
              "--eps", "2/255,0.1")
    assert res.code == 0, res.stderr
    assert "clean accuracy" in res.stdout and "pgd@2/255" in res.stdout and "pgd@0.1" in res.stdout
    assert "worst case" in res.stdout
    d = _json(cli("attack", trained_digits, "--data", "digits", "-n", "64", "--attack", "pgd", "--steps", "3",
                  "--eps", "2/255,0.1", "--json"))
    assert d["robust_acc"]["pgd@0.1"] < d["robust_acc"]["pgd@2/255"]


def test_attack_seed_reproduces(cli, trained_digits):
    args = ("attack", trained_digits, "--data", "digits", "-n", "64", "--attack", "pgd", "--steps", "3", "--eps",
            "0.08", "--seed", "5", "--json")
    a, b = _json(cli(*args)), _json(cli(*args))
    assert a["robust_acc"] == b["robust_acc"] and a["attacks"]["pgd"]["mean_norm"] == b["attacks"]["pgd"]["mean_norm"]


def test_save_and_replay(cli, trained_digits, tmp_path):
    from safetensors import safe_open

    adv = tmp_path / "adv.safetensors"
    d = _json(cli("attack", trained_digits, "--data", "digits", "-n", "80", "--attack", "pgd", "--steps", "5",
                  "--eps", "0.1", "-o", adv, "--json"))
    assert d["output"] == str(adv)
    with safe_open(str(adv), "pt") as f:
        meta = f.metadata()
        x, xa, y = f.get_tensor("images"), f.get_tensor("adv_images"), f.get_tensor("labels")
    info = json.loads(meta["rcomp.adversarial"])
    assert info["attack"]["attack"] == "pgd" and info["source_sha256"] == d["sha256"]
    assert x.shape == xa.shape == (80, 1, 8, 8) and y.shape == (80,)
    assert float((xa - x).abs().max()) <= 0.1 + 1e-5 and float(xa.min()) >= 0 and float(xa.max()) <= 1
    # replaying against the model that made them reproduces its robust accuracy
    r = _json(cli("attack", trained_digits, "--from", adv, "--json"))
    assert r["clean_acc"] == pytest.approx(d["clean_acc"])
    assert r["worst_case_acc"] == pytest.approx(d["robust_acc"]["pgd"])
    # against another model (transfer): a valid report
    other = make_checkpoint(tmp_path / "other.safetensors", seed=3)
    t = _json(cli("attack", other, "--from", adv, "--json"))
    assert t["n"] == 80 and 0 <= t["worst_case_acc"] <= t["clean_acc"]
    # existing output refused without --force
    again = cli("attack", trained_digits, "--data", "digits", "-n", "8", "--attack", "fgsm", "--eps", "0.1", "-o", adv)
    assert_one_line_error(again, "already exists")


@pytest.mark.parametrize("args,needle", [
    (("--attack", "pgdd", "--eps", "0.1"), "unknown attack"),
    (("--attack", "pgd", "--eps", "0.1", "--norm", "l7"), "unknown norm"),
    (("--attack", "pgd", "--eps", "8/0"), "divides by zero"),
    (("--attack", "pgd", "--eps", "abc"), "not a number"),
    (("--attack", "pgd", "--eps", "-0.1"), "outside [0, 1]"),
    (("--attack", "pgd", "--eps", "1.5"), "outside [0, 1]"),
    (("--attack", "pgd", "--eps", "0.1", "--steps", "0"), "--steps"),
    (("--attack", "pgd", "--eps", "0.1", "--restarts", "0"), "--restarts"),
    (("--attack", "pgd", "--eps", "0.1", "--loss", "hinge"), "unknown loss"),
    (("--attack", "pgd", "--eps", "0.1", "--alpha", "0"), "--alpha"),
    (("--attack", "fgsm", "--eps", "0.1", "--steps", "4"), "single step"),
    (("--attack", "pgd"), "--eps"),
    (("--eps", "0.1",), "--attack"),
    (("--attack", "pgd,fgsm", "--eps", "0.1,0.2", "-o", "x.safetensors"), "one eps per file"),
])
def test_attack_bad_input(cli, tiny_ckpt, args, needle):
    assert_one_line_error(cli("attack", tiny_ckpt, "--data", "digits", *args), needle)


def test_attack_refuses_mismatched_data_and_files(cli, tmp_path, tiny_ckpt):
    five = make_checkpoint(tmp_path / "five.safetensors", num_classes=5)
    assert_one_line_error(cli("attack", five, "--data", "digits", "--attack", "pgd", "--eps", "0.1"), "classes")
    adv = tmp_path / "adv.safetensors"
    assert cli("attack", tiny_ckpt, "--data", "digits", "-n", "8", "--attack", "fgsm", "--eps", "0.1", "-o", adv).code == 0
    big = make_checkpoint(tmp_path / "big.safetensors", shape=(1, 12, 12))
    assert_one_line_error(cli("attack", big, "--from", adv), "1x8x8", "1x12x12")
    assert_one_line_error(cli("attack", tiny_ckpt, "--from", tiny_ckpt), "not a file of adversarial examples")
    assert_one_line_error(cli("attack", tiny_ckpt, "--from", tmp_path / "none.safetensors"), "does not exist")
    assert_one_line_error(cli("attack", tiny_ckpt, "--attack", "pgd", "--eps", "0.1"), "--data")


# ---------------------------------------------------------------------------
# rcomp bench
# ---------------------------------------------------------------------------

BENCH = ("--data", "digits", "-n", "48", "--attack", "fgsm,pgd", "--steps", "3", "--eps", "0.1",
         "--latency-batch", "8")


def test_bench_json(cli, trained_digits, tiny_ckpt):
    d = _json(cli("bench", trained_digits, tiny_ckpt, *BENCH, "--format", "json"))
    assert d["data"] == "digits" and d["n"] == 48 and d["threads"] >= 1
    assert set(d["attacks"]) == {"fgsm", "pgd"} and d["attacks"]["pgd"]["steps"] == 3
    assert d["attacks"]["fgsm"]["steps"] == 1  # --steps does not apply to fgsm in a list
    trained, rnd = d["models"]
    for m in (trained, rnd):
        for key in ("path", "sha256", "arch", "params", "macs", "size_bytes", "latency_ms", "clean_acc",
                    "robust_acc", "worst_case_acc", "gradient_source"):
            assert key in m
        assert set(m["latency_ms"]) == {"1", "8"} and all(v > 0 for v in m["latency_ms"].values())
        assert m["worst_case_acc"] <= min(m["robust_acc"].values()) <= m["clean_acc"]
        assert m["params"] > 0 and m["macs"] > 0 and m["size_bytes"] > 0
    assert trained["clean_acc"] > 0.85 > rnd["clean_acc"]
    assert trained["robust_acc"]["pgd"] < trained["clean_acc"]


def test_bench_formats_and_gate(cli, trained_digits, tmp_path):
    out = tmp_path / "bench.csv"
    res = cli("bench", trained_digits, *BENCH, "--format", "csv", "-o", out)
    assert res.code == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 1 and float(rows[0]["clean_acc"]) > 0.85 and "robust_acc[pgd]" in rows[0]
    light = ("--data", "digits", "-n", "32", "--attack", "fgsm", "--eps", "0.1", "--latency-batch", "0")
    md = cli("bench", trained_digits, *light, "--format", "markdown")
    assert md.code == 0 and "| clean %" in md.stdout and "fgsm %" in md.stdout
    # the CI gate: results still on stdout, one line on stderr naming model and metric, exit 1
    gate = cli("bench", trained_digits, *light, "--fail-under", "clean=0.5,fgsm=0.999")
    assert gate.code == 1 and "clean %" in gate.stdout
    err = gate.stderr.strip().splitlines()[-1]
    assert err.startswith("rcomp: error:") and trained_digits.name in err and "fgsm" in err and "clean " not in err
    assert cli("bench", trained_digits, *light, "--fail-under", "clean=0.5,worst=0.0").code == 0


def test_bench_eps_sweep_keys_and_stdin(cli, trained_digits):
    d = _json(cli("bench", "--data", "digits", "-n", "32", "--attack", "fgsm", "--eps", "0.05,0.1",
                  "--latency-batch", "0", "--format", "json", stdin=f"{trained_digits}\n"))
    assert set(d["models"][0]["robust_acc"]) == {"fgsm@0.05", "fgsm@0.1"}
    assert list(d["models"][0]["latency_ms"]) == ["1"]


@pytest.mark.parametrize("args,needle", [
    (("--fail-under", "pgd=0.4"), "unknown metric"),
    (("--attack", "fgsm", "--eps", "0.1", "--fail-under", "clean"), "METRIC=VALUE"),
    (("--attack", "fgsm", "--eps", "0.1", "--fail-under", "clean=2"), "[0, 1]"),
    (("--format", "xml"), "--format"),
    (("--attack", "bim", "--eps", "0.1"), "unknown attack"),
])
def test_bench_bad_input(cli, tiny_ckpt, args, needle):
    assert_one_line_error(cli("bench", tiny_ckpt, "--data", "digits", *args), needle)


def test_bench_refuses_class_mismatch(cli, tmp_path):
    five = make_checkpoint(tmp_path / "five.safetensors", num_classes=5)
    res = cli("bench", five, "--data", "digits", "-n", "8")
    assert res.code == 2 and "classes" in res.stderr.splitlines()[-1]
