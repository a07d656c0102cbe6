"""Shared test helpers: run the CLI in-process, make tiny checkpoints."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")  # history timestamps: reproducible bytes


# ----- deprecations raised by rcomp's own calls fail the test (unless allow-listed) --------------------

_RCOMP_DIR = str(Path(__file__).resolve().parent.parent / "rcomp") + os.sep


def _is_deprecation(category, message) -> bool:
    return issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) or (
        issubclass(category, UserWarning) and "deprecat" in str(message).lower())


def _maintainers_see_deprecations() -> None:
    """The in-process CLI (run_cli) spares no deprecation here; CLI subprocesses still spare users."""
    from rcomp.deprecations import maintainer_mode

    maintainer_mode(True)


_maintainers_see_deprecations()


@contextlib.contextmanager
def _deprecations_from_rcomp():
    """Collect deprecation warnings emitted while rcomp code is on the stack and no allow-list entry
    (rcomp.deprecations.ALLOWED) names them; every other warning goes on to pytest as usual."""
    import traceback
    import warnings

    from rcomp.deprecations import allowed

    found: list[str] = []
    with warnings.catch_warnings():
        for cat in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("always", cat)
        forward = warnings._showwarnmsg_impl  # pytest's recorder, while it records

        def show(message, category, filename, lineno, file=None, line=None):
            if _is_deprecation(category, message):
                stack = traceback.extract_stack()[:-1]
                if any(f.filename.startswith(_RCOMP_DIR) for f in stack) and allowed(str(message)) is None:
                    rc = next(f for f in reversed(stack) if f.filename.startswith(_RCOMP_DIR))
                    found.append(f"{category.__name__} via {rc.filename[len(_RCOMP_DIR) - 6:]}:{rc.lineno}: "
                                 f"{str(message).splitlines()[0][:200]}")
                    return
                if allowed(str(message)) is not None:
                    return
            forward(warnings.WarningMessage(message, category, filename, lineno, file, line))

        warnings.showwarning = show
        yield found


def _check_deprecations(found: list[str], when: str) -> None:
    if found:
        pytest.fail(f"{when}: deprecation warning(s) raised by rcomp's own calls and not in the allow-list "
                    "(rcomp.deprecations.ALLOWED; add one with its removal plan, or stop the call):\n  "
                    + "\n  ".join(dict.fromkeys(found)), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _deprecations_from_rcomp() as found:
        res = yield
    _check_deprecations(found, "setup")
    return res


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _deprecations_from_rcomp() as found:
        res = yield
    _check_deprecations(found, "test")
    return res


def pytest_collection_modifyitems(session, config, items):
    """Slow tests first (stable order otherwise): with pytest-xdist's load scheduling both workers start on
    the long end-to-end tests, so none of them is left to run alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config):
    """One torch thread for the whole session, whichever files run: figures computed in-process then
    do not depend on the machine's core count or on whether tests/test_train_core.py (which sets the same)
    was collected."""
    import torch

    torch.set_num_threads(1)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class _TTY(io.StringIO):
    def isatty(self) -> bool:  # no pipe: commands must not wait for stdin
        return True


def run_cli(*args, stdin: str | None = None) -> Result:
    """Run ``rcomp ARGS`` in this process (fast: torch is already imported) and capture everything."""
    from rcomp.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_in = sys.stdin
    sys.stdin = io.StringIO(stdin) if stdin is not None else _TTY()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdin = old_in
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children: a cost bound that holds on a
    loaded machine, where wall time does not (hangs are caught by timeouts, not by this)."""
    import resource
    import time

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def assert_one_line_error(res: Result, *needles: str, code: int = 2) -> None:
    """A refusal: the expected exit code, one line on stderr starting 'rcomp: error:', no traceback."""
    assert res.code == code, (res.code, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("rcomp: error:") or lines[0].startswith("Usage:") or "Error" in lines[0], lines
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    assert res.stdout == ""


def make_checkpoint(path: Path, arch: str = "convnet8", shape=(1, 8, 8), num_classes: int = 10, seed: int = 0,
                    **kw) -> Path:
    """Save a freshly initialised (seeded) model as an rcomp checkpoint."""
    import torch

    from rcomp.models.loading import save
    from rcomp.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes, input_shape=shape, **kw)
    model.eval()
    save(model, path)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    """A random convnet8 for 1x8x8 digits."""
    return make_checkpoint(tmp_path / "tiny.safetensors")


_trained: dict = {}


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory) -> Path:
    """A convnet8 trained on digits (1x8x8) for a few epochs: clean accuracy well above chance.

    Trained once per session with a plain loop, so tests of attacks and compression
    have a meaningful model without depending on `rcomp finetune`.
    """
    import torch
    import torch.nn.functional as F

    from rcomp.data.registry import data_info, get_dataset, make_loader
    from rcomp.models.loading import save
    from rcomp.models.registry import build_model

    path = tmp_path_factory.mktemp("trained") / "digits_convnet8.safetensors"
    info = data_info("digits")
    torch.manual_seed(0)
    model = build_model("convnet8", 10, (1, 8, 8), list(info.mean), list(info.std), dataset="digits")
    ds = get_dataset("digits", "train", model.meta.input)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        for x, y in make_loader(ds, 64, shuffle=True, seed=0):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    save(model, path)
    return path


@pytest.fixture(scope="module")
def digits_model(trained_digits):
    """The trained digits convnet8, loaded (one per test module)."""
    from rcomp.models.loading import load

    return load(trained_digits)
