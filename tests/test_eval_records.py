"""The one evaluation loop's per-example records, and `attack -o` / `--from` for every attack,
suite and cascade (issue 22 point 1, issue 23 point 1)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcomp.attacks import make_attack
from rcomp.evaluation.cascade import BatchBook
from rcomp.evaluation.robustness import PerBatch, evaluate, replay

from conftest import assert_one_line_error, make_checkpoint

FAST_AUTO = ("--attack", "auto", "--steps", "3", "--queries", "30", "--targets", "2")


def _json(res):
    assert res.code == 0, res.stderr
    return json.loads(res.stdout)


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["rcomp.adversarial"])


@pytest.fixture(scope="module")
def model(digits_model):
    return digits_model


@pytest.fixture(scope="module")
def loader(model):
    from rcomp.data.registry import get_dataset, make_loader

    return make_loader(get_dataset("digits", "test", model.meta.input), 32, n=96)


@pytest.mark.parametrize("attack", [FAST_AUTO, ("--attack", "fgsm,pgd", "--steps", "3", "--cascade"),
                                    ("--attack", "fgsm,pgd,square", "--steps", "3", "--queries", "30")])
def test_o_saves_the_worst_case_of_every_stage_and_from_replays_it(cli, trained_digits, tmp_path, attack):
    """The held-out command of issue 22 (small budgets): -o with a suite, a cascade, or several
    independent attacks writes, per point, the example of the first stage that fooled it; --from
    on the same model gives the same robust accuracy on the same points."""
    adv = tmp_path / "adv.safetensors"
    d = _json(cli("attack", trained_digits, "--data", "digits", "-n", "48", "--batch-size", "20", *attack,
                  "--eps", "0.1", "--seed", "0", "-o", adv, "--json"))
    t, info = _tensors(adv)
    stages = info["stages"]
    assert stages == list(d["attacks"]) and set(info["attack"]["stages"]) == set(stages)
    assert all(info["attack"]["stages"][k] == d["attacks"][k]["params"] for k in stages)
    x, xa, y, stage, ok = t["images"], t["adv_images"], t["labels"], t["stage"], t["clean_correct"].bool()
    assert x.shape == xa.shape == (48, 1, 8, 8)
    # index: each point's index in the split (-n 48 is a stratified sample, not the first 48), its image that one
    from rcomp.data.registry import get_dataset
    from rcomp.data.subset import choose
    from rcomp.models.loading import load

    ds = get_dataset("digits", "test", load(trained_digits).meta.input)
    want = [int(i) for i in choose(ds, 48)[0]]
    assert t["index"].tolist() == want != list(range(48))
    assert all(torch.equal(x[k], ds[i][0]) and int(y[k]) == ds[i][1] for k, i in enumerate(want))
    assert float((xa - x).abs().max()) <= 0.1 + 1e-6 and float(xa.min()) >= 0 and float(xa.max()) <= 1
    assert int(ok.sum()) == round(d["clean_acc"] * 48)
    robust = ok & (stage < 0)
    assert int(robust.sum()) == round(d["worst_case_acc"] * 48)
    assert (stage[~ok] == -1).all() and bool((xa[~ok] == x[~ok]).all())  # wrong clean: never attacked
    assert 0 < int((stage >= 0).sum()) and int(stage.max()) < len(stages)
    # a point's stage is the first whose figure dropped: points fooled by stage k are counted out after it
    for k, key in enumerate(stages):
        assert int((ok & ((stage < 0) | (stage > k))).sum()) == round(d["stage_robust_acc"][key] * 48)
    from rcomp.models.loading import load

    m = load(trained_digits)
    with torch.inference_mode():
        fooled = m(xa).argmax(1) != y
    assert bool((fooled[stage >= 0]).all()) and not bool(fooled[robust].any())
    r = _json(cli("attack", trained_digits, "--from", adv, "--json"))
    assert r["worst_case_acc"] == d["worst_case_acc"] and r["clean_acc"] == d["clean_acc"]
    assert r["source"]["points_differing_from_record"] == 0


def test_o_with_several_eps_is_refused_before_any_work(cli, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    res = cli("attack", junk, "--data", "digits", "--attack", "auto", "--eps", "0.05,0.1", "-o", tmp_path / "a.st")
    assert_one_line_error(res, "one eps per file", "--eps")
    assert not (tmp_path / "a.st").exists()


def test_replay_counts_points_that_changed(cli, trained_digits, tmp_path):
    """--from on another model says how many points differ from the record."""
    adv = tmp_path / "adv.safetensors"
    _json(cli("attack", trained_digits, "--data", "digits", "-n", "40", "--attack", "fgsm", "--eps", "0.2", "-o", adv,
              "--json"))
    other = make_checkpoint(tmp_path / "other.safetensors", seed=3)
    r = _json(cli("attack", other, "--from", adv, "--json"))
    assert r["source"]["points_differing_from_record"] > 0


def test_records_agree_with_the_figures(model, loader):
    def atk():
        return {"fgsm": make_attack("fgsm", 0.1), "pgd": make_attack("pgd", 0.1, steps=3, seed=1)}

    for cascade in (True, False):
        res = evaluate(model, loader, atk(), progress=False, cascade=cascade, records="images")
        rec = res.records
        assert len(rec) == res.n == 96 and rec.index.tolist() == loader.indices  # dataset indices of the sample
        assert int(rec.clean_correct.sum()) / 96 == res.clean_acc
        assert int(rec.robust.sum()) / 96 == res.worst_case_acc
        assert rec.adv.shape == rec.clean.shape == (96, 1, 8, 8)
        assert torch.allclose(rec.norm, (rec.adv - rec.clean).flatten(1).abs().amax(1), atol=1e-6)
    plain = evaluate(model, loader, atk(), progress=False)  # records change no figure
    assert plain.records is None and plain.worst_case_acc == res.worst_case_acc


def test_cascade_and_independent_records_match_for_pointwise_attacks(model, loader):
    """auto's stages draw per point, so which stage fools a point first is the same either way."""
    from rcomp.attacks.auto import auto_stages

    kw = {"steps": 3, "queries": 20, "targets": 2, "seed": 0}
    ind = evaluate(model, loader, auto_stages(0.1, as_suite=False, **kw), progress=False, records=True)
    cas = evaluate(model, loader, auto_stages(0.1, **kw), progress=False, records=True)
    assert cas.mode == "cascade" and ind.mode == "independent"
    assert torch.equal(ind.records.stage, cas.records.stage)
    assert torch.equal(ind.records.norm[ind.records.stage >= 0], cas.records.norm[cas.records.stage >= 0])


def test_replay_is_the_loop_and_per_batch_attacks_see_the_whole_batch(model, loader):
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    xa = (x + 0.2 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    r = replay(model, x, xa, y, batch_size=40, records=True)
    with torch.inference_mode():
        want = (model(x).argmax(1) == y) & (model(xa).argmax(1) == y)
    assert torch.equal(r.records.robust, want) and r.gradient_source.startswith("none")
    seen = []

    def make(key):
        def attack(m, xb, yb):
            seen.append((key, len(yb)))
            return xb
        return attack

    keyed = ((x[s:s + 40], y[s:s + 40], s) for s in range(0, 96, 40))
    evaluate(model, keyed, {"k": PerBatch(make)}, progress=False)
    assert seen == [(0, 40), (40, 40), (80, 16)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.booleans(), min_size=3, max_size=3)), min_size=1, max_size=12),
       st.booleans())
def test_batchbook_first_stage_is_the_first_that_fooled(points, cascade):
    """Property: stage = first attack (in order) that fooled a point among those that ran on it;
    still = correct clean and fooled by none; the kept example is the first fooling one."""
    ok = torch.tensor([p[0] for p in points])
    fools = torch.tensor([p[1] for p in points])  # fools[i, k]: attack k would fool point i
    x = torch.zeros(len(points), 1)
    book = BatchBook(ok, cascade, x)
    for k in range(3):
        idx = book.pool()
        adv = torch.full((len(idx), 1), float(k + 1))
        book.record(object(), k, idx, ~fools[idx, k], adv, torch.full((len(idx),), float(k + 1)))
    for i, (c, f) in enumerate(points):
        first = next((k for k in range(3) if f[k]), -1) if c else -1
        assert int(book.first[i]) == first
        assert bool(book.still[i]) == (c and first < 0)
        assert float(book.kept[i]) == (0.0 if not c else (first + 1 if first >= 0 else 3.0))


# ---------------------------------------------------------------------------
# --records DIR and --resume (issue 23 point 2)
# ---------------------------------------------------------------------------

_TIMING = {"seconds", "examples_per_s", "output", "records"}


def _figures(d):
    """The report without its timings."""
    if isinstance(d, dict):
        return {k: _figures(v) for k, v in d.items() if k not in _TIMING}
    return d


RECORDS_RUN = ("--data", "digits", "-n", "64", "--batch-size", "8", *FAST_AUTO, "--eps", "0.1", "--seed", "0",
               "--json")


@pytest.mark.slow
def test_resume_after_kill_9_ends_identical_to_an_uninterrupted_run(cli, trained_digits, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    whole = _json(cli("attack", trained_digits, *RECORDS_RUN, "--records", tmp_path / "whole"))
    assert len(list((tmp_path / "whole").glob("chunk-*.safetensors"))) == 8
    rec = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a slower budget, so the kill lands mid-run; the records then must not be resumable by the fast one
    proc = subprocess.Popen([sys.executable, "-m", "rcomp", "attack", str(trained_digits), *RECORDS_RUN,
                             "--records", str(rec)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(rec.glob("chunk-*.safetensors"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        still_running = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list(rec.glob("chunk-*.safetensors")))
    assert 2 <= done and (still_running and done < 8)
    again = cli("attack", trained_digits, *RECORDS_RUN, "--records", rec)
    assert_one_line_error(again, "--resume")
    resumed = cli("attack", trained_digits, *RECORDS_RUN, "--records", rec, "--resume")
    assert f"{done} batch(es)" in resumed.stderr
    assert _figures(_json(resumed)) == _figures(whole)
    assert not list(rec.glob(".*"))  # no temp file left behind
    # the chunk files are the same bytes as the uninterrupted run's
    for a in sorted((tmp_path / "whole").glob("chunk-*")):
        from rcomp.io.serialize import load_tensors

        ta, tb = load_tensors(a), load_tensors(rec / a.name)
        for k in ("index", "label", "clean_correct", "stage", "norm", "attacked", "robust", "attack_norm", "calls"):
            assert torch.equal(ta[k], tb[k]), (a.name, k)


def test_records_of_another_evaluation_are_refused(cli, trained_digits, tmp_path):
    rec = tmp_path / "rec"
    base = ("--data", "digits", "-n", "16", "--batch-size", "8", "--attack", "pgd", "--steps", "2", "--eps", "0.1")
    assert cli("attack", trained_digits, *base, "--records", rec).code == 0
    assert_one_line_error(cli("attack", trained_digits, *base, "--seed", "1", "--records", rec, "--resume"),
                          "another evaluation", "seed")
    assert_one_line_error(cli("attack", trained_digits, *base[:-1], "0.2", "--records", rec, "--resume"),
                          "another evaluation", "attacks")
    other = make_checkpoint(tmp_path / "other.safetensors", seed=3)
    assert_one_line_error(cli("attack", other, *base, "--records", rec, "--resume"), "another evaluation",
                          "model_sha256")
    assert_one_line_error(cli("attack", trained_digits, *base, "--resume"), "--records")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli("attack", trained_digits, *base, "--records", tmp_path / "file"), "is a file")


def test_bench_records_resume_identical(cli, trained_digits, tmp_path):
    args = ("bench", trained_digits, "--data", "digits", "-n", "24", "--batch-size", "8", "--attack", "fgsm,pgd",
            "--steps", "2", "--eps", "0.1", "--latency-batch", "0", "--json", "--records", tmp_path / "r")
    first = _json(cli(*args))
    (sub,) = (tmp_path / "r").iterdir()
    chunks = sorted(sub.glob("chunk-*"))
    assert len(chunks) == 3
    chunks[-1].unlink()  # as if killed during the last batch
    again = _json(cli(*args, "--resume"))
    strip = {"eval_seconds", "latency", "latency_ms"}
    assert [{k: v for k, v in m.items() if k not in strip} for m in again["models"]] == \
        [{k: v for k, v in m.items() if k not in strip} for m in first["models"]]


# ---------------------------------------------------------------------------
# sharding over torchrun processes (issue 23 point 3)
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_two_gloo_processes_equal_one_point_by_point(cli, trained_digits, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from rcomp.io.serialize import load_tensors

    one = _json(cli("attack", trained_digits, *RECORDS_RUN, "--records", tmp_path / "one"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "rcomp", "attack", str(trained_digits), *RECORDS_RUN,
           "--records", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)  # rank 0 alone prints
    assert "2 processes shared the 64 points" in proc.stderr
    assert _figures(two) == _figures(one)
    for a in sorted((tmp_path / "one").glob("chunk-*")):
        ta, tb = load_tensors(a), load_tensors(tmp_path / "two" / a.name)
        for k in ("index", "label", "clean_correct", "stage", "norm", "attacked", "robust", "attack_norm"):
            assert torch.equal(ta[k], tb[k]), (a.name, k)


def test_sharding_refuses_attacks_that_draw_per_batch_in_a_cascade(model, loader, tmp_path):
    from rcomp.errors import RcompError
    from rcomp.evaluation.records import RecordDir
    from rcomp.evaluation.robustness import batch_independent, shard_refusal

    assert batch_independent(make_attack("auto", 0.1).stages["apgd-ce"])
    assert batch_independent(make_attack("square", 0.1)) and batch_independent(make_attack("fgsm", 0.1))
    assert not batch_independent(make_attack("pgd", 0.1)) and not batch_independent(make_attack("apgd", 0.1))
    per_call = {"fgsm": make_attack("fgsm", 0.1), "pgd": make_attack("pgd", 0.1)}
    assert shard_refusal(per_call, cascade=False) is None  # independent: the streams are moved on per batch
    assert "pgd draw" in shard_refusal(per_call, cascade=True)
    assert "cannot tell" in shard_refusal({"k": PerBatch(lambda key: None)}, cascade=False)
    store = RecordDir(tmp_path / "r", {"test": 1})
    with pytest.raises(RcompError, match="pgd draw"):
        evaluate(model, loader, per_call, progress=False, store=store, shard=(0, 2), cascade=True)
    with pytest.raises(RcompError, match="--records"):
        evaluate(model, loader, {"fgsm": make_attack("fgsm", 0.1)}, progress=False, shard=(0, 2))


@pytest.mark.parametrize("name,kw", [("pgd", {"steps": 3}), ("apgd", {"steps": 3}), ("cw", {"steps": 3}),
                                     ("fgsm", {"random_start": True}), ("pgd", {"steps": 2, "targeted": True})])
def test_skip_call_moves_the_streams_as_the_skipped_batch_would(model, loader, name, kw):
    """What sharding rests on for attacks drawing per call: a process that passes over a batch
    (skip_call with its number of points correct clean) then attacks the next batch exactly as one
    process attacking both does."""
    batches = list(loader)
    whole = make_attack(name, 0.1, seed=5, **kw)
    with torch.inference_mode():
        oks = [model(x).argmax(1) == y for x, y in batches]
    want = [whole(model, x[ok], y[ok]) for (x, y), ok in zip(batches, oks, strict=True)]
    skipping = make_attack(name, 0.1, seed=5, **kw)
    for i, ((x, y), ok) in enumerate(zip(batches, oks, strict=True)):
        if i % 2 == 0:
            skipping.skip_call(int(ok.sum()))
        else:
            assert torch.equal(skipping(model, x[ok], y[ok]), want[i]), i
    fresh = make_attack(name, 0.1, seed=5, **kw)  # without moving the streams on, the draws differ
    x, y = batches[1]
    assert not torch.equal(fresh(model, x[oks[1]], y[oks[1]]), want[1])


# ---------------------------------------------------------------------------
# AutoAttack's checks in every report (issue 23 point 4)
# ---------------------------------------------------------------------------

class _Wrap(torch.nn.Module):
    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, x):
        return self.fn(self.inner(x), x)


def _auto_small():
    from rcomp.attacks.auto import auto_stages

    return auto_stages(0.1, steps=5, queries=20, targets=3, seed=0)


def test_checks_flag_masked_models_and_stay_quiet_on_a_plain_one(model, loader):
    plain = evaluate(model, loader, _auto_small(), progress=False).checks
    assert plain["warnings"] == [] and plain["randomized"] == plain["softmax_output"] == 0
    assert plain["apgd_ce_t_gap"] is not None and plain["apgd_ce_t_gap"] < 0.1

    soft = evaluate(_Wrap(model, lambda z, x: z.softmax(1)).eval(), loader, _auto_small(), progress=False).checks
    assert soft["softmax_output"] == 96 and any("probabilities" in w for w in soft["warnings"])

    noisy = _Wrap(model, lambda z, x: z + 0.01 * torch.randn_like(z)).eval()
    r = evaluate(noisy, loader, _auto_small(), progress=False).checks
    assert r["randomized"] == 96 and any("randomised" in w for w in r["warnings"])

    scaled = evaluate(_Wrap(model, lambda z, x: z * 1e4).eval(), loader, _auto_small(), progress=False).checks
    assert scaled["zero_gradients"] > 0 and any("zero gradient" in w for w in scaled["warnings"])
    assert scaled["apgd_ce_t_gap"] >= 0.1 and any("saturated" in w for w in scaled["warnings"])


def test_checks_reach_the_report(cli, trained_digits):
    d = _json(cli("attack", trained_digits, "--data", "digits", "-n", "16", *FAST_AUTO, "--eps", "0.1", "--json"))
    assert set(d["checks"]) >= {"randomized", "softmax_output", "zero_gradients", "square_after_gradients",
                                "apgd_ce_t_gap", "warnings"}


def test_progress_rate_and_eta_leave_out_resumed_points():
    import io

    from rcomp.progress import Progress

    bar = Progress(100, "x", stream=io.StringIO())
    bar.skip(50)
    bar._t0 -= 10  # 10 s ago
    bar.update(10)
    line = bar.line()
    assert "60/100" in line and " 1.0/s" in line and "ETA 40s" in line
