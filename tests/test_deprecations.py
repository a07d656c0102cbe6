"""The deprecation policy: rcomp's own calls may raise only allow-listed deprecations (each with its removal
plan); the tests see them, command-line users are spared unless they ask."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from tests.conftest import _deprecations_from_rcomp, run_cli


def _warn_in_stage(monkeypatch, text: str) -> None:
    import rcomp.stages.export as export_stage

    def run(cfg, inputs, **_):
        warnings.warn(text, DeprecationWarning, stacklevel=2)
        raise SystemExit(0)

    monkeypatch.setattr(export_stage, "run", run)


def test_a_deprecation_raised_inside_rcomp_is_caught(monkeypatch, tiny_ckpt):
    _warn_in_stage(monkeypatch, "frobnicate() is deprecated")
    with _deprecations_from_rcomp() as found:
        run_cli("export", tiny_ckpt)
    assert len(found) == 1 and "frobnicate() is deprecated" in found[0] and "DeprecationWarning" in found[0]


def test_allow_listed_and_foreign_deprecations_pass(monkeypatch, tiny_ckpt):
    _warn_in_stage(monkeypatch, "torch.ao.quantization is deprecated and will be removed in 2.10")
    with _deprecations_from_rcomp() as found:
        run_cli("export", tiny_ckpt)
        warnings.warn("something else is deprecated", DeprecationWarning, stacklevel=1)  # no rcomp on the stack
    assert found == []


def test_every_allow_list_entry_has_a_removal_plan():
    from rcomp.deprecations import ALLOWED, allowed

    assert ALLOWED
    for a in ALLOWED:
        assert "removal plan:" in a.plan
    plan = allowed("torch.ao.quantization is deprecated").plan
    assert plan.startswith("torch.ao int8:") and "--backend pt2e" in plan
    assert allowed("unrelated") is None


def test_the_api_no_longer_hides_torch_ao_deprecation(trained_digits):
    import torch

    from rcomp.models.loading import load
    from rcomp.quant.ptq import quantize

    model = load(trained_digits)
    with pytest.warns(DeprecationWarning, match="torch.ao.quantization is deprecated"):
        quantize(model, [torch.rand(8, 1, 8, 8)], bits=8)


@pytest.mark.slow
def test_cli_spares_users_unless_debug(trained_digits, tmp_path):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    args = [sys.executable, "-m", "rcomp", "quantize", str(trained_digits), "--calib-n", "32", "--eval-n", "0"]
    quiet = subprocess.run([*args, "-o", str(tmp_path / "a.safetensors")], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert "DeprecationWarning" not in quiet.stderr
    loud = subprocess.run([*args, "-o", str(tmp_path / "b.safetensors"), "--debug"], env=env, capture_output=True,
                          text=True)
    assert loud.returncode == 0, loud.stderr
    assert "torch.ao.quantization is deprecated" in loud.stderr
