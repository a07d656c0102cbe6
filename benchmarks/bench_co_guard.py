"""Where should the catastrophic-overfitting guard's gap rule fire? (issue 25)

Trains single-step (and PGD) runs on the bundled data with the guard's rules switched OFF (it still
measures at every epoch) and prints, per run, the guard's figures on its 128 fixed check images:
clean, PGD-5, the training adversary's accuracy ("single": FGSM / N-FGSM as trained against) and
plain FGSM from the clean point at eps ("fgsm"), then the largest single - PGD gap after the first
epoch and what the shipped rules would have said. Healthy runs must stay below the gap threshold,
overfit ones (FGSM without random start at a large eps) above it.

    python benchmarks/bench_co_guard.py                 # the table of the default cases
    python benchmarks/bench_co_guard.py --case NAME     # one case, per-epoch figures
    python benchmarks/bench_co_guard.py --quick         # one short case (smoke)

CPU, 1 thread; 20 s to a minute per case, about 15 minutes for the default table. A case is ``name: finetune options`` (``from=standard:E``
starts from a standard-trained model of E epochs on the same data and shape, as the demo's fine-tuning).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

try:
    from benchmarks.common import main, row
except ImportError:  # run as a script
    from common import main, row

COMMAND = "python benchmarks/bench_co_guard.py"
BASE = "arch=convnet8 input_shape=1,8,8 optimizer=adam lr=0.003 eval_n=0 batch_size=128"
CASES = {
    # healthy: PGD-trained, FGSM with random start, N-FGSM
    "digits-pgd-0.15": "data=digits adv=pgd steps=5 eps=0.15 epochs=10",
    "digits-fgsmrs-0.1": "data=digits adv=fgsm eps=0.1 epochs=15",
    "digits-fgsmrs-0.2": "data=digits adv=fgsm eps=0.2 epochs=15",
    "digits-nfgsm-0.1": "data=digits adv=n-fgsm eps=0.1 epochs=15",
    "digits-nfgsm-0.15": "data=digits adv=n-fgsm eps=0.15 epochs=15",
    "digits-nfgsm-0.2": "data=digits adv=n-fgsm eps=0.2 epochs=15",
    "digits-nfgsm-0.1-ft": "data=digits adv=n-fgsm eps=0.1 epochs=8 optimizer=sgd lr=0.01 from=standard:15",
    "digits-fgsm-0.1": "data=digits adv=fgsm random_start=0 eps=0.1 epochs=15",
    "digits-fgsm-0.2": "data=digits adv=fgsm random_start=0 eps=0.2 epochs=15",
    "fake-nfgsm-0.15": "data=fake augment=0 adv=n-fgsm eps=0.15 epochs=15",
    "fake-fgsmrs-0.15": "data=fake augment=0 adv=fgsm eps=0.15 epochs=15",
    "fake-fgsm-0.15": "data=fake augment=0 adv=fgsm random_start=0 eps=0.15 epochs=15",
    # overfit: plain FGSM at large eps
    "fake-fgsm-0.2": "data=fake augment=0 adv=fgsm random_start=0 eps=0.2 epochs=10",
    "fake-fgsm-0.175": "data=fake augment=0 adv=fgsm random_start=0 eps=0.175 epochs=15",
    # larger images: more pixels for the noise of N-FGSM to average out
    "fake16-fgsm-0.2": "data=fake augment=0 input_shape=1,16,16 adv=fgsm random_start=0 eps=0.2 epochs=10",
    "fake16-nfgsm-0.2": "data=fake augment=0 input_shape=1,16,16 adv=n-fgsm eps=0.2 epochs=10",
    "fake3-fgsm-0.2": "data=fake augment=0 input_shape=3,8,8 adv=fgsm random_start=0 eps=0.2 epochs=12",
    "fake3-nfgsm-0.2": "data=fake augment=0 input_shape=3,8,8 adv=n-fgsm eps=0.2 epochs=12",
    "fake-nfgsm1-0.2": "data=fake augment=0 adv=n-fgsm noise=1 eps=0.2 epochs=12",
    "fake-fgsm-0.15-lr01": "data=fake augment=0 adv=fgsm random_start=0 eps=0.15 epochs=15 lr=0.01",
    "fake-nfgsm-0.15-lr01": "data=fake augment=0 adv=n-fgsm eps=0.15 epochs=15 lr=0.01",
    "fake-fgsm-0.175-b32": "data=fake augment=0 adv=fgsm random_start=0 eps=0.175 epochs=10 batch_size=32",
    "fake-nfgsm-0.175-b32": "data=fake augment=0 adv=n-fgsm eps=0.175 epochs=10 batch_size=32",
    "fake-fgsm-0.16": "data=fake augment=0 adv=fgsm random_start=0 eps=0.16 epochs=15",
    "fake-nfgsm-0.16": "data=fake augment=0 adv=n-fgsm eps=0.16 epochs=15",
    "mlp-fake-fgsm-0.2": "data=fake augment=0 arch=mlp adv=fgsm random_start=0 eps=0.2 epochs=12",
    "mlp-fake-nfgsm-0.2": "data=fake augment=0 arch=mlp adv=n-fgsm eps=0.2 epochs=12",
    "mlp-fake-fgsm-0.2-s1": "data=fake augment=0 arch=mlp adv=fgsm random_start=0 eps=0.2 epochs=12 seed=1",
    "mlp-fake-nfgsm-0.2-s1": "data=fake augment=0 arch=mlp adv=n-fgsm eps=0.2 epochs=12 seed=1",
    "mlp-fake-fgsm-0.2-s2": "data=fake augment=0 arch=mlp adv=fgsm random_start=0 eps=0.2 epochs=12 seed=2",
    "mlp-fake-nfgsm-0.2-s2": "data=fake augment=0 arch=mlp adv=n-fgsm eps=0.2 epochs=12 seed=2",
    "mlp-fake-fgsmrs-0.2": "data=fake augment=0 arch=mlp adv=fgsm eps=0.2 epochs=12",
    "mlp-fake-pgd-0.2": "data=fake augment=0 arch=mlp adv=pgd steps=5 eps=0.2 epochs=12",
    # from a briefly standard-trained start (2 epochs), Adam lr 1e-3
    "fake-fgsm-0.175-s2": "data=fake augment=0 adv=fgsm random_start=0 eps=0.175 epochs=10 lr=0.001 from=standard:2",
    "fake-nfgsm-0.175-s2": "data=fake augment=0 adv=n-fgsm eps=0.175 epochs=10 lr=0.001 from=standard:2",
    "fake-fgsm-0.15-s2": "data=fake augment=0 adv=fgsm random_start=0 eps=0.15 epochs=10 lr=0.001 from=standard:2",
    "fake-nfgsm-0.15-s2": "data=fake augment=0 adv=n-fgsm eps=0.15 epochs=10 lr=0.001 from=standard:2",
    "fake-fgsm-0.2-s2": "data=fake augment=0 adv=fgsm random_start=0 eps=0.2 epochs=10 lr=0.001 from=standard:2",
    "fake-nfgsm-0.2-s2": "data=fake augment=0 adv=n-fgsm eps=0.2 epochs=10 lr=0.001 from=standard:2",
    # from a standard-trained start (as the demo fine-tunes: SGD lr 0.01 momentum 0.9)
    "fake-fgsm-0.2-sgd": "data=fake augment=0 adv=fgsm random_start=0 eps=0.2 epochs=8 optimizer=sgd lr=0.01 "
                         "from=standard:10",
    "fake-nfgsm-0.2-sgd": "data=fake augment=0 adv=n-fgsm eps=0.2 epochs=8 optimizer=sgd lr=0.01 from=standard:10",
    "fake-fgsm-0.15-sgd": "data=fake augment=0 adv=fgsm random_start=0 eps=0.15 epochs=8 optimizer=sgd lr=0.01 "
                          "from=standard:10",
    "fake-nfgsm-0.15-sgd": "data=fake augment=0 adv=n-fgsm eps=0.15 epochs=8 optimizer=sgd lr=0.01 from=standard:10",
    "fake-fgsm-0.175-ft": "data=fake augment=0 adv=fgsm random_start=0 eps=0.175 epochs=12 from=standard:10",
    "fake-nfgsm-0.175-ft": "data=fake augment=0 adv=n-fgsm eps=0.175 epochs=12 from=standard:10",
    "fake16-fgsm-0.2-ft": "data=fake augment=0 input_shape=1,16,16 adv=fgsm random_start=0 eps=0.2 epochs=8 "
                          "from=standard:5",
    "fake16-nfgsm-0.2-ft": "data=fake augment=0 input_shape=1,16,16 adv=n-fgsm eps=0.2 epochs=8 from=standard:5",
}
#: the table in docs/benchmarks.md (the other cases are the search; run them with --case)
DEFAULT = ["digits-pgd-0.15", "digits-fgsmrs-0.1", "digits-fgsmrs-0.2", "digits-nfgsm-0.1", "digits-nfgsm-0.15",
           "digits-nfgsm-0.2", "digits-nfgsm-0.1-ft", "digits-fgsm-0.1", "digits-fgsm-0.2", "fake-nfgsm-0.15",
           "fake-fgsmrs-0.15", "fake-fgsm-0.15", "fake-fgsm-0.2", "fake-fgsm-0.175", "mlp-fake-pgd-0.2",
           "mlp-fake-fgsmrs-0.2", "mlp-fake-fgsm-0.2", "mlp-fake-nfgsm-0.2", "mlp-fake-fgsm-0.2-s1",
           "mlp-fake-nfgsm-0.2-s1", "mlp-fake-fgsm-0.2-s2", "mlp-fake-nfgsm-0.2-s2"]
#: cases that overfit catastrophically (PGD-5 stays near 0 while the training adversary is beaten): the guard must fire
OVERFIT = {"fake-fgsm-0.2", "fake-fgsm-0.175", "fake-fgsm-0.175-s2", "mlp-fake-fgsm-0.2", "mlp-fake-fgsm-0.2-s1",
           "mlp-fake-fgsm-0.2-s2", "mlp-fake-fgsmrs-0.2"}
QUICK = {"quick": "data=digits adv=fgsm random_start=0 eps=0.1 epochs=2 n=256"}


def parse(spec: str) -> dict:
    out = {}
    for item in f"{BASE} {spec}".split():
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _value(k: str, v: str):
    if k == "input_shape":
        return tuple(int(s) for s in v.split(","))
    if k in ("random_start", "augment"):
        return bool(int(v))
    if k in ("epochs", "steps", "eval_n", "batch_size", "n", "seed"):
        return int(v)
    if k in ("eps", "lr", "alpha", "noise"):
        return float(v)
    return v


def one(spec: str, workdir: Path) -> dict:
    """Run one case with the guard measuring but never firing; its per-check figures."""
    import torch

    import rcomp.train.guards as G
    from rcomp.attacks import make_attack
    from rcomp.stages import finetune as F

    torch.set_num_threads(1)
    opts = parse(spec)
    start = opts.pop("from", None)
    cfg_kw = {k: _value(k, v) for k, v in opts.items()}
    inputs: list = []
    if start:
        epochs = int(start.split(":")[1])
        base = {**cfg_kw, "adv": "none", "epochs": epochs, "optimizer": "adam", "lr": 0.003}
        for k in ("random_start", "eps", "steps"):
            base.pop(k, None)
        res = F.run(F.Config(**base), [], log=lambda *a: None, default_output=False)
        ckpt = workdir / "start.safetensors"
        import rcomp

        rcomp.save(res.model, ckpt)
        inputs = [str(ckpt)]
        cfg_kw.pop("arch"), cfg_kw.pop("input_shape")
    fgsm_plain: list[float] = []
    clean: list[float] = []
    orig_check = G.OverfitGuard.check

    def check(self, module, epoch, train_adv):
        hit = orig_check(self, module, epoch, train_adv)
        fgsm_plain.append(self._accuracy(module, make_attack("fgsm", self.eps, norm=self.norm))[1])
        clean.append(self.checks[-1]["clean"])
        return hit

    import rcomp.train.loop as L

    saved = (G.CO_GAP, G.overfit_collapsed, G.OverfitGuard.check, L.SINGLE_STEP)
    G.CO_GAP, G.overfit_collapsed, G.OverfitGuard.check = 9.0, (lambda *a, **k: False), check
    L.SINGLE_STEP = (*L.SINGLE_STEP, "pgd")  # a PGD-trained run gets the guard's figures too (single: its PGD)
    try:
        res = F.run(F.Config(**cfg_kw, allow_collapse=True), inputs, log=lambda *a: None, default_output=False)
    finally:
        G.CO_GAP, G.overfit_collapsed, G.OverfitGuard.check, L.SINGLE_STEP = saved
    m = res.report
    g = m.get("overfit_guard")
    epochs = m["epochs"]
    checks = [{"epoch": i, "pgd": p} for i, p in enumerate(g["pgd_acc"])] if g else []
    for i, c in enumerate(checks):
        c["single"] = g["single_acc"][i]
        c["fgsm"] = fgsm_plain[i]
        c["clean"] = clean[i]
        c["train_acc"] = epochs[i - 1]["train_acc"] if i else None
    return {"checks": checks, "final_train_acc": epochs[-1]["train_acc"],
            "final_train_adv": epochs[-1].get("train_adv_acc")}


def verdicts(checks: list[dict], n: int = 128) -> dict:
    """What the shipped rules would have said on a run's figures (first firing epoch or None)."""
    import rcomp.train.guards as G

    level = G.CollapseMonitor(10).level
    best, fall, gap = None, None, None
    for c in checks:
        if best is not None and fall is None and best["clean"] >= level \
                and G.overfit_collapsed(c["pgd"], best["pgd"], None, None, n=n):
            fall = c["epoch"]
        if c["epoch"] > 0 and gap is None and c["single"] is not None and c["clean"] >= level \
                and G.overfit_gap(c["single"], c["pgd"]):
            gap = c["epoch"]
        best = c if best is None or c["pgd"] > best["pgd"] else best
    return {"fall": fall, "gap": gap}


def summary(name: str, r: dict) -> dict:
    after = r["checks"][1:]
    gaps = [c["single"] - c["pgd"] for c in after if c["single"] is not None]
    fgaps = [c["fgsm"] - c["pgd"] for c in after]
    last = r["checks"][-1]
    v = verdicts(r["checks"])
    return {"case": name, "pgd best": max(c["pgd"] for c in r["checks"]), "pgd last": last["pgd"],
            "single last": last["single"], "fgsm last": last["fgsm"],
            "max gap single-pgd": max(gaps) if gaps else None, "max gap fgsm-pgd": max(fgaps) if fgaps else None,
            "train acc": r["final_train_acc"], "fall rule": v["fall"], "gap rule": v["gap"]}


def run(quick: bool = False, cases: dict | None = None) -> list[dict]:
    if cases is None and "--case" in sys.argv:
        names = sys.argv[sys.argv.index("--case") + 1].split(",")
        unknown = [n for n in names if n not in CASES]
        if unknown:
            print(f"unknown --case {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
            sys.exit(2)
        cases = {n: CASES[n] for n in names}
    cases = cases or (QUICK if quick else {k: CASES[k] for k in DEFAULT})
    rows = []
    for name, spec in cases.items():
        with tempfile.TemporaryDirectory() as d:
            r = one(spec, Path(d))
        s = summary(name, r)
        print(name, spec, flush=True)
        for c in r["checks"]:
            print(f"  epoch {c['epoch']:3d} clean {c['clean']:.3f} pgd {c['pgd']:.3f} single {c['single'] if c['single'] is None else round(c['single'], 3)} "
                  f"fgsm {c['fgsm']:.3f} train_acc {c['train_acc']}", flush=True)
        print("  " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()),
              flush=True)
        fired = s["fall rule"] is not None or s["gap rule"] is not None
        want = name in OVERFIT
        rows.append(row(f"{name}: guard fires (fall epoch {s['fall rule']}, gap epoch {s['gap rule']}; max gap "
                        f"{s['max gap single-pgd']:.2f})", fired, "fires" if want else "quiet", fired == want,
                        command=f"{COMMAND} --case {name}"))
    return rows


if __name__ == "__main__":
    main(run, {"--case": {"metavar": "NAME[,NAME]",
                          "help": "run these cases (printing per-epoch figures) instead of the default table; "
                                  "names: " + ", ".join(CASES)}})
