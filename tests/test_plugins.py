"""Plugins: an installed package adds an attack (and an importance, an architecture, a dataset) through
entry points, with no change to rcomp. The package is built in a temp folder as a ``*.dist-info`` with
``entry_points.txt`` on PYTHONPATH, then used from the CLI (a real subprocess), a recipe (``rcomp
run``), ``bench``, ``rcomp info`` and the Python API. A broken plugin is a one-line warning naming its
package; a plugin may not take a built-in name; refusing a bad value still imports no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent

PLUGIN = '''
"""A demo rcomp plugin: the 'nudge' attack, a 'flat' importance, a 'tinynet' architecture, a 'blobs' dataset."""
from rcomp.catalog import Entry

NUDGE = Entry("nudge", "rcomp_demo_plugin.impl:Nudge", help="one signed-gradient step of size eps (demo plugin)",
              paper="none", takes=("steps",))
FLAT = Entry("flat", "rcomp_demo_plugin.impl:flat_importance", help="filter L1 norm again (demo plugin)")
TINYNET = Entry("tinynet", "rcomp_demo_plugin.impl:tinynet", help="a one-conv net (demo plugin)",
                extra={"input": (1, 8, 8)})
BLOBS = Entry("blobs", "rcomp_demo_plugin.impl:blobs", help="three classes of bright squares (demo plugin)",
              extra={"num_classes": 3, "shape": (1, 8, 8), "mean": (0.5,), "std": (0.25,)})
'''

IMPL = '''
import torch
from torch import nn

from rcomp.attacks.base import Attack, ascent_direction, project

LOADED = True


class Nudge(Attack):
    name = "nudge"

    def __init__(self, eps, norm="linf", *, steps=None, seed=None):
        super().__init__(eps, norm, seed=seed)
        self.steps = 1 if steps is None else int(steps)

    def perturb(self, model, x, y, target):
        x_adv = x
        for _ in range(self.steps):
            _, grad, _ = self.loss_and_grad(model, x_adv, y, target)
            x_adv = project(x, x_adv + self.eps * ascent_direction(grad, self.norm), self.eps, self.norm)
        return x_adv

    def _extra_params(self):
        return {"steps": self.steps, "plugin": "rcomp-demo-plugin"}


def flat_importance():
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=1)


class Blobs(torch.utils.data.Dataset):
    num_classes = 3

    def __init__(self, n, spec, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.rand(n, *spec.shape, generator=g) * 0.2
        for i, c in enumerate(self.y.tolist()):
            self.x[i, :, 2 * c:2 * c + 3, 2 * c:2 * c + 3] = 1.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def blobs(entry, train, spec, root, *, seed=0, **_):
    return Blobs(60 if train else 30, spec, seed + (0 if train else 1))


def tinynet(spec, num_classes, **kw):
    return nn.Sequential(nn.Conv2d(spec.channels, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * spec.height * spec.width, num_classes))
'''

ENTRY_POINTS = """
[rcomp.attacks]
nudge = rcomp_demo_plugin:NUDGE
pgd = rcomp_demo_plugin:NUDGE
{broken}

[rcomp.importances]
flat = rcomp_demo_plugin:FLAT

[rcomp.architectures]
tinynet = rcomp_demo_plugin:TINYNET

[rcomp.datasets]
blobs = rcomp_demo_plugin:BLOBS
"""


def _install(site: Path, broken: bool = False) -> Path:
    """A plugin 'installed' as a dist-info folder beside its package (what pip would leave)."""
    pkg = site / "rcomp_demo_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN)
    (pkg / "impl.py").write_text(IMPL)
    info = site / "rcomp_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rcomp-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS.format(
        broken="broken = rcomp_demo_plugin.missing:THING" if broken else ""))
    if broken:  # a second package whose plugin module fails to import
        bad = site / "rcomp_bad_plugin-1.0.dist-info"
        bad.mkdir()
        (bad / "METADATA").write_text("Metadata-Version: 2.1\nName: rcomp-bad-plugin\nVersion: 1.0\n")
        (bad / "entry_points.txt").write_text("[rcomp.attacks]\nexplode = rcomp_bad_plugin_missing:ENTRY\n")
    return site


@pytest.fixture
def site(tmp_path):
    return _install(tmp_path / "site", broken=True)


def _rcomp(site: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rcomp", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture
def in_process(site, monkeypatch):
    """The plugin on sys.path of this process, the catalogues re-read (and forgotten afterwards)."""
    from rcomp.attacks.catalog import ATTACKS
    from rcomp.data.catalog import DATASETS
    from rcomp.models.catalog import ARCHITECTURES
    from rcomp.pruning.catalog import IMPORTANCES

    monkeypatch.syspath_prepend(str(site))
    cats = (ATTACKS, IMPORTANCES, ARCHITECTURES, DATASETS)
    for c in cats:
        c.reset()
    yield site
    for c in cats:
        c.reset()
    for m in [m for m in sys.modules if m.startswith("rcomp_demo_plugin")]:
        del sys.modules[m]


@pytest.mark.slow
def test_plugin_attack_from_the_cli_and_a_recipe(site, tmp_path, trained_digits):
    res = _rcomp(site, "attack", trained_digits, "--data", "digits", "--attack", "nudge", "--eps", "0.1",
                 "--steps", "2", "-n", "40", "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    a = rep["attacks"]["nudge"]
    assert a["params"]["attack"] == "nudge" and a["params"]["plugin"] == "rcomp-demo-plugin"
    assert a["params"]["steps"] == 2 and a["params"]["eps"] == 0.1
    assert 0 <= rep["robust_acc"]["nudge"] < rep["clean_acc"]  # the plugin's attack really ran
    assert "failed to load" not in res.stderr  # no other plugin module was imported, so no broken one either

    # an option the plugin's entry does not take is refused by the library factory, naming it
    res = _rcomp(site, "attack", trained_digits, "--data", "digits", "--attack", "nudge", "--eps", "0.1",
                 "--alpha", "0.01", "-n", "8", "--device", "cpu")
    assert res.returncode == 2 and "nudge takes no alpha" in res.stderr and "Traceback" not in res.stderr

    # the same attack from a recipe: the file names it by catalogue name only
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: plugin
        stages:
          - name: gate
            command: bench
            inputs: [{trained_digits}]
            options: {{data: digits, attack: "nudge,fgsm", eps: "0.1,8/255", n: 40, format: json, device: cpu}}
            output: gate.json
    """))
    res = _rcomp(site, "run", recipe, "--out-dir", tmp_path / "out", "--json")
    assert res.returncode == 0, res.stderr
    gate = json.loads((tmp_path / "out" / "gate.json").read_text())
    keys = set(gate["models"][0]["robust_acc"])
    assert keys == {"nudge@0.1", "nudge@8/255", "fgsm@0.1", "fgsm@8/255"}, keys
    assert gate["attacks"]["nudge@8/255"]["plugin"] == "rcomp-demo-plugin"

    # a plugin architecture trained on a plugin dataset; the checkpoint names both by catalogue name
    out = tmp_path / "tiny.safetensors"
    res = _rcomp(site, "finetune", "--arch", "tinynet", "--data", "blobs", "--epochs", "1", "--eval-n", "10",
                 "--device", "cpu", "-o", out)
    assert res.returncode == 0, res.stderr
    res = _rcomp(site, "info", out, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["arch"] == "tinynet"
    assert json.loads(res.stdout)["dataset"] == "blobs"


def test_listing_shows_plugins_and_warns_about_broken_and_clashing_ones(site, tmp_path):
    res = _rcomp(site, "info", "--attacks")
    assert res.returncode == 0, res.stderr
    assert "nudge" in res.stdout and "plugin from rcomp-demo-plugin" in res.stdout
    assert res.stdout.count("\npgd ") + res.stdout.startswith("pgd ") == 1  # the clash did not replace pgd
    warnings = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(warnings) == 3, res.stderr  # the clash, the missing module of rcomp-demo-plugin, rcomp-bad-plugin
    assert any("'pgd'" in w and "built-in" in w and "rcomp-demo-plugin" in w for w in warnings)
    assert any("rcomp-bad-plugin" in w and "failed to load" in w for w in warnings)
    assert all(w.startswith("warning:") and "Traceback" not in w for w in warnings)
    res = _rcomp(site, "info", "--importances", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["flat"]["plugin"] == "rcomp-demo-plugin"
    res = _rcomp(site, "info", "--datasets", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["blobs"]["num_classes"] == 3
    res = _rcomp(site, "info", "--models", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["plugins"]["tinynet"]["plugin"] == "rcomp-demo-plugin"
    # a broken plugin named on the command line is a one-line error naming its package
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    res = _rcomp(site, "attack", ckpt, "--attack", "explode", "--eps", "0.1", "--data", "digits")
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("rcomp: error:")]
    assert res.returncode == 2 and len(errors) == 1 and "rcomp-bad-plugin" in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_name_is_refused_before_torch_and_lists_plugins(site):
    code = ("import sys\nfrom rcomp.cli import main\ntry:\n    main(['attack', 'x.safetensors', '--attack', 'nudgee', "
            "'--eps', '0.1'])\nexcept SystemExit as e:\n    print('torch' in sys.modules, e.code)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.split() == ["False", "2"], (res.stdout, res.stderr)
    assert "did you mean nudge" in res.stderr and "rcomp_demo_plugin" not in sys.modules


def test_plugin_entries_through_the_python_api(in_process, trained_digits):
    import torch

    from rcomp.attacks import make_attack
    from rcomp.attacks.catalog import ATTACKS
    from rcomp.models.loading import load
    from rcomp.models.registry import build_model
    from rcomp.pruning import prune

    assert "nudge" in ATTACKS.plugin_names() and "pgd" not in ATTACKS.plugin_names()
    atk = make_attack("nudge", 0.1, steps=1, seed=0)
    model = load(trained_digits)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    x_adv = atk(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)
    with pytest.raises(Exception, match="nudge takes no queries"):
        make_attack("nudge", 0.1, queries=5)
    net = build_model("tinynet", 10, (1, 8, 8))
    assert net.meta.arch.name == "tinynet" and net(x).shape == (4, 10)
    pruned, rep = prune(build_model("convnet8", 10, (1, 8, 8)), 0.5, method="flat")
    assert rep.method == "flat" and rep.params_after < rep.params_before

    from rcomp.data.registry import data_info, get_dataset, native_shape

    assert data_info("blobs").num_classes == 3 and native_shape("blobs")[0] == (1, 8, 8)
    ds = get_dataset("blobs", "train", net.meta.input, seed=0)
    x0, y0 = ds[0]
    assert len(ds) == 60 and x0.shape == (1, 8, 8) and 0 <= y0 < 3 and ds.num_classes == 3


def test_a_plugin_cannot_be_named_by_code_in_a_file(in_process, tmp_path, cli):
    """A recipe names entries by catalogue name; a module path is refused before anything is imported."""
    ckpt = make_checkpoint(tmp_path / "m.safetensors", seed=0)
    r = tmp_path / "r.yaml"
    r.write_text(f"stages:\n  - name: a\n    command: attack\n    input: {ckpt}\n    options: {{data: digits, "
                 "attack: 'rcomp_demo_plugin.impl:Nudge', eps: 0.1}\n")
    res = cli("run", r, "--out-dir", tmp_path / "o")
    assert res.code == 2 and "unknown attack" in res.stderr and "rcomp_demo_plugin.impl" not in sys.modules
