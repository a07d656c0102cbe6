"""Checkpoint format v1: round trips, refusals, no code from metadata, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rcomp
from rcomp.errors import RcompError
from rcomp.io.header import read_header
from rcomp.models.loading import load, save
from rcomp.models.registry import build_model

from conftest import assert_one_line_error, make_checkpoint

TORCHVISION_ARCHS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                     "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf"]


def _outputs_equal(a, b, shape, n=4):
    torch.manual_seed(1)
    x = torch.rand(n, *shape)
    a.eval()
    b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("arch,shape", [("convnet8", (1, 28, 28)), ("resnet18-cifar", (3, 32, 32)),
                                        ("mlp", (1, 8, 8))] + [(a, (3, 64, 64)) for a in TORCHVISION_ARCHS])
def test_round_trip_bit_identical(tmp_path, arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, input_shape=shape, mean=[0.4] * shape[0], std=[0.2] * shape[0])
    # perturb BN statistics so buffers are exercised, not left at their defaults
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "m.safetensors"
    save(model, path)
    loaded = load(path)
    assert loaded.meta.arch.name == arch
    assert loaded.meta.input.shape == shape
    assert loaded.meta.num_classes == 7
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert _outputs_equal(model, loaded, shape)


def test_saving_twice_gives_identical_bytes(tmp_path):
    model = build_model("convnet8", 10, (1, 8, 8))
    save(model, tmp_path / "a.safetensors")
    save(model, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@settings(max_examples=15, deadline=None)
@given(hidden=st.lists(st.integers(1, 12), min_size=0, max_size=3), classes=st.integers(1, 12),
       c=st.sampled_from([1, 3]), hw=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_round_trip_property(tmp_path_factory, hidden, classes, c, hw, seed):
    torch.manual_seed(seed)
    model = build_model("mlp", classes, (c, hw, hw), kwargs={"hidden": hidden})
    path = tmp_path_factory.mktemp("rt") / "m.safetensors"
    save(model, path)
    loaded = load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
        assert v.dtype == loaded.state_dict()[k].dtype


def test_pruned_structure_round_trips(tmp_path):
    """Shrinking channels by hand (as structured pruning does) reloads with the smaller shapes."""
    model = build_model("convnet8", 10, (1, 8, 8))
    conv = model.net.features[0]
    nxt = model.net.features[2]
    keep = torch.arange(0, 32, 2)
    conv.weight = torch.nn.Parameter(conv.weight.data[keep].clone())
    conv.bias = torch.nn.Parameter(conv.bias.data[keep].clone())
    conv.out_channels = 16
    nxt.weight = torch.nn.Parameter(nxt.weight.data[:, keep].clone())
    nxt.in_channels = 16
    path = tmp_path / "p.safetensors"
    save(model, path)
    meta = json.loads(read_header(path).metadata["rcomp.compression"])
    assert meta["structure"]["features.0"]["out_channels"] == 16
    loaded = load(path)
    assert loaded.net.features[0].weight.shape[0] == 16
    assert _outputs_equal(model, loaded, (1, 8, 8))


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

def _rewrite_metadata(src: Path, dst: Path, **changes) -> Path:
    """Copy ``src`` with metadata fields changed (value None removes the key)."""
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    meta = dict(read_header(src).metadata)
    for k, v in changes.items():
        key = "rcomp." + k
        if v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
    dst.write_bytes(st_save(load_file(str(src)), metadata=meta))
    return dst


def test_refuses_truncated_file(tiny_ckpt, tmp_path, cli):
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2])
    assert_one_line_error(cli("info", bad), "truncated")
    with pytest.raises(RcompError, match="truncated"):
        load(bad)


def test_refuses_random_bytes(tmp_path, cli):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(os.urandom(4096))
    assert_one_line_error(cli("info", bad), "not a safetensors file")


def test_refuses_non_json_header(tmp_path, cli):
    bad = tmp_path / "hdr.safetensors"
    body = b"this is not json"
    bad.write_bytes(struct.pack("<Q", len(body)) + body)
    assert_one_line_error(cli("info", bad), "not JSON")


def test_refuses_oversized_header_without_reading_it(tmp_path, cli):
    bad = tmp_path / "big.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert_one_line_error(cli("info", bad), "header length")


def test_refuses_unknown_format_version(tiny_ckpt, tmp_path, cli):
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "v9.safetensors", format="9")
    assert_one_line_error(cli("info", bad), "format 9", "upgrade")


def test_refuses_plain_safetensors_without_metadata(tiny_ckpt, tmp_path, cli):
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "plain.safetensors", format=None)
    assert_one_line_error(cli("info", bad), "not an rcomp checkpoint", "rcomp convert")


@pytest.mark.parametrize("field,value,needle", [
    ("arch", "{not json", "rcomp.arch"),
    ("arch", json.dumps({"kwargs": {}}), "rcomp.arch"),
    ("input", json.dumps({"channels": 1, "height": 8, "width": 8, "mean": [0, 0], "std": [1]}), "mean and std"),
    ("input", None, "rcomp.input"),
    ("classes", json.dumps({"num_classes": 0}), "classes"),
    ("history", json.dumps({"a": 1}), "rcomp.history"),
])
def test_refuses_malformed_metadata(tiny_ckpt, tmp_path, cli, field, value, needle):
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "bad.safetensors", **{field: value})
    assert_one_line_error(cli("info", bad), needle)


def test_refuses_tensors_that_do_not_fit(tiny_ckpt, tmp_path):
    arch = json.dumps({"name": "convnet8", "kwargs": {"hidden": 64}})
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "shape.safetensors", arch=arch)
    with pytest.raises(RcompError, match="shape"):
        load(bad)


def test_refuses_structure_naming_unknown_module(tiny_ckpt, tmp_path):
    comp = json.dumps({"structure": {"features.99": {"out_channels": 3}}})
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "mod.safetensors", compression=comp)
    with pytest.raises(RcompError, match="features.99"):
        load(bad)


def test_refuses_structure_setting_other_attributes(tiny_ckpt, tmp_path):
    comp = json.dumps({"structure": {"features.0": {"forward": 3}}})
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "attr.safetensors", compression=comp)
    with pytest.raises(RcompError, match="unknown attribute"):
        load(bad)


def test_refuses_unregistered_architecture(tiny_ckpt, tmp_path):
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "arch.safetensors",
                            arch=json.dumps({"name": "no_such_net", "kwargs": {}}))
    with pytest.raises(RcompError, match="unknown architecture"):
        load(bad)


# ---------------------------------------------------------------------------------------------
# no code from metadata
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module on sys.path that leaves a marker file when imported, and a factory inside it."""
    marker = tmp_path / "imported.marker"
    (tmp_path / "rcomp_test_evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        from rcomp.models.builtin import MLP
        def factory(num_classes=10):
            return MLP(64, num_classes)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("rcomp_test_evil", None)


@pytest.mark.parametrize("name", ["rcomp_test_evil:factory", "os:system", "subprocess:run"])
def test_metadata_naming_a_module_never_imports_it(tiny_ckpt, tmp_path, cli, evil_module, name):
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "evil.safetensors", arch=json.dumps({"name": name, "kwargs": {}}))
    res = cli("info", bad)  # info only describes: it names the factory, imports nothing
    assert res.code == 0 and name in res.stdout
    with pytest.raises(RcompError, match="never imports code named by a file"):
        load(bad)
    assert not evil_module.exists()
    assert "rcomp_test_evil" not in sys.modules


def test_user_factory_loads_when_named_by_the_user(tmp_path, evil_module):
    model = build_model("rcomp_test_evil:factory", num_classes=10, input_shape=(1, 8, 8))
    path = tmp_path / "user.safetensors"
    save(model, path)
    sys.modules.pop("rcomp_test_evil", None)
    evil_module.unlink()
    with pytest.raises(RcompError, match="--arch rcomp_test_evil:factory"):
        load(path)
    assert not evil_module.exists()
    loaded = load(path, factory="rcomp_test_evil:factory")
    assert _outputs_equal(model, loaded, (1, 8, 8))
    assert load(path, trust_factory=True).meta.arch.name == "rcomp_test_evil:factory"


def test_malformed_factory_name_is_refused(tiny_ckpt, tmp_path):
    bad = _rewrite_metadata(tiny_ckpt, tmp_path / "path.safetensors",
                            arch=json.dumps({"name": "/tmp/x.py:run", "kwargs": {}}))
    with pytest.raises(RcompError):
        load(bad, trust_factory=True)


# ---------------------------------------------------------------------------------------------
# atomic writing
# ---------------------------------------------------------------------------------------------

def test_writer_killed_mid_write_leaves_no_file(tmp_path):
    out = tmp_path / "out.safetensors"
    script = textwrap.dedent(f"""
        import sys, time
        from rcomp.io.atomic import atomic_write_bytes
        def writer(fh):
            fh.write(b"x" * 100000)
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write_bytes({str(out)!r}, writer)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert not out.exists()


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    from rcomp.io.atomic import atomic_write_bytes

    out = tmp_path / "out.bin"
    out.write_bytes(b"previous")

    def failing(fh):
        fh.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(out, failing)
    assert out.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [out]


def test_save_refuses_existing_output_and_input(tiny_ckpt, tmp_path):
    model = load(tiny_ckpt)
    with pytest.raises(RcompError, match="--force"):
        save(model, tiny_ckpt)
    with pytest.raises(RcompError, match="is the input"):
        save(model, tiny_ckpt, force=True, inputs=(tiny_ckpt,))
    before = tiny_ckpt.read_bytes()
    save(model, tiny_ckpt, force=True)
    assert tiny_ckpt.read_bytes() == before


def test_api_is_lazy_and_complete():
    assert callable(rcomp.load) and callable(rcomp.save) and callable(rcomp.build_model)
    with pytest.raises(AttributeError):
        rcomp.no_such_thing  # noqa: B018


def test_make_checkpoint_helper(tmp_path):
    p = make_checkpoint(tmp_path / "x.safetensors", "resnet18-cifar", (3, 16, 16))
    assert load(p).meta.arch.name == "resnet18-cifar"


def test_refusal_tells_a_python_user_force_true(tiny_ckpt):
    with pytest.raises(RcompError, match=r"force=True \(--force on the command line\)"):
        save(load(tiny_ckpt), tiny_ckpt)


# ---------------------------------------------------------------------------------------------
# every torchvision classification model round-trips through convert (issue 16)
# ---------------------------------------------------------------------------------------------

def _torchvision_cases():
    """(name, side, marks): one representative of every family runs; larger members of a family
    (the same code at larger widths) run with RCOMP_ALL_TORCHVISION=1, the huge ones never."""
    import torchvision.models as tvm

    fast = {"convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "mnasnet0_5", "mnasnet0_75",
            "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
            "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5",
            "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1",
            "swin_t", "swin_v2_t"}
    slow = {"alexnet": 64, "inception_v3": 224, "maxvit_t": 224, "vit_b_32": 224,
            "efficientnet_v2_s": 32, "wide_resnet50_2": 32}
    huge = ("vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf")
    everything = os.environ.get("RCOMP_ALL_TORCHVISION", "") not in ("", "0")
    for name in tvm.list_models(module=tvm):
        side = slow.get(name, 224 if name.startswith(("vit", "inception", "maxvit")) else 32)
        if name in huge:
            marks = [pytest.mark.skip(reason=f"{name}: 300M+ parameters, minutes to build on a CPU")]
        elif name in fast:
            marks = []
        elif name in slow:
            marks = [pytest.mark.slow]
        else:
            marks = [pytest.mark.skipif(not everything, reason="a larger member of a family tested above (same "
                                                               "code); set RCOMP_ALL_TORCHVISION=1 to run it")]
        yield pytest.param(name, side, marks=marks, id=name)


@pytest.mark.parametrize("name,side", list(_torchvision_cases()))
def test_every_torchvision_model_converts_and_round_trips(tmp_path, name, side):
    from rcomp.models.convert import convert_state_dict

    torch.manual_seed(0)
    model = build_model(name, num_classes=5, input_shape=(3, side, side)).eval()
    torch.save(model.net.state_dict(), tmp_path / "w.pth")
    converted = convert_state_dict(tmp_path / "w.pth", name, 5, (3, side, side))
    save(converted, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    assert _outputs_equal(model, loaded, (3, side, side), n=2)


# ---------------------------------------------------------------------------------------------
# publishing: exclusive, umask, SIGTERM, what the reader accepts (issue 15)
# ---------------------------------------------------------------------------------------------

_RACER = textwrap.dedent("""
    import sys
    from rcomp.errors import RcompError
    from rcomp.models.loading import save
    from rcomp.models.registry import build_model
    import torch
    torch.manual_seed(int(sys.argv[2]))
    model = build_model("mlp", 3, (1, 4, 4))
    print("ready", flush=True)
    sys.stdin.readline()  # the parent says go once both are ready: they save at the same moment
    try:
        save(model, sys.argv[1])
    except RcompError as exc:
        print(f"rcomp: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("won")
""")


def test_two_racing_writers_exactly_one_wins(tmp_path):
    """Two processes save the same new file at the same moment: exactly one wins, the other gets one line.

    The start is a handshake (each child says "ready" after importing torch, then waits for "go"), not a
    guess of how long imports take, so a loaded machine makes the test slower, never wrong."""
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(out), str(seed)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for seed in (1, 2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.poll() is not None else ""
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [(p.wait(600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert len(loser[2].strip().splitlines()) == 1 and "already exists" in loser[2]
    assert load(out).meta.arch.name == "mlp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_exclusive_publish_keeps_a_file_that_appeared_meanwhile(tmp_path):
    from rcomp.io.atomic import atomic_write_bytes

    out = tmp_path / "o.bin"

    def writer(fh):
        out.write_bytes(b"other process")  # appears after the checks, before publishing
        fh.write(b"ours")

    with pytest.raises(RcompError, match="already exists"):
        atomic_write_bytes(out, writer, exclusive=True)
    assert out.read_bytes() == b"other process"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        make_checkpoint(tmp_path / "m.safetensors", "mlp", (1, 4, 4))
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_check_output_path_before_work(tmp_path):
    from rcomp.io.atomic import check_output_path

    assert check_output_path(tmp_path / "new.safetensors") == tmp_path / "new.safetensors"
    with pytest.raises(RcompError, match="does not exist"):
        check_output_path(tmp_path / "no" / "x.safetensors")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(RcompError, match="cannot create files"):
                check_output_path(ro / "x.safetensors")
    finally:
        ro.chmod(0o700)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(RcompError, match="FIFO"):
        check_output_path(tmp_path / "fifo", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "ro"]


_SIGTERM_CHILD = textwrap.dedent("""
    import sys
    from rcomp.signals import install_handlers, interrupted
    install_handlers()
    import rcomp.io.atomic as atomic
    def writer(fh):
        chunk = b"x" * (1 << 20)
        for i in range(100000):  # a "big checkpoint": far more than gets written before the signal
            fh.write(chunk)
            if i == 2:
                print("WRITING", flush=True)
    try:
        atomic.atomic_write_bytes(sys.argv[1], writer)
    except KeyboardInterrupt as exc:
        sys.exit(interrupted(exc))
""")


def test_sigterm_removes_the_temporary_file_and_exits_143(tmp_path):
    out = tmp_path / "big.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    assert list(tmp_path.glob("*.rcomp-tmp"))  # the temporary file exists while writing
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    err = proc.stderr.read()
    assert rc == 143, err
    assert err.strip() == "rcomp: terminated; no output was written"
    assert list(tmp_path.iterdir()) == []


def test_history_near_the_header_limit_is_trimmed_and_readable(tmp_path):
    from rcomp.io.format import HISTORY_MAX_BYTES, TRIMMED, history_entry

    model = build_model("mlp", 3, (1, 4, 4))
    entry = history_entry("finetune", {"note": "x" * 100_000})
    model.meta.history = [history_entry("convert", {"arch": "mlp"})] + [dict(entry, n=i) for i in range(200)]
    path = tmp_path / "h.safetensors"
    save(model, path)  # 20 MB of history: more than the reader's 16 MiB header limit
    assert read_header(path).header_len < 16 * 1024 * 1024
    hist = load(path).meta.history
    assert hist[0]["command"] == "convert" and hist[1]["command"] == TRIMMED
    kept = len(hist) - 2
    assert hist[1]["params"]["dropped"] == 200 - kept and hist[-1]["n"] == 199
    assert len(json.dumps(hist)) <= HISTORY_MAX_BYTES
    # trimming again counts the entries dropped before
    loaded = load(path)
    loaded.meta.history += [dict(entry, n=200 + i) for i in range(50)]
    save(loaded, tmp_path / "h2.safetensors")
    hist2 = load(tmp_path / "h2.safetensors").meta.history
    assert hist2[1]["params"]["dropped"] == 250 - (len(hist2) - 2)


def test_writer_refuses_a_header_the_reader_would_refuse(tmp_path):
    model = build_model("mlp", 3, (1, 4, 4))
    model.meta.extra["blob"] = "x" * (17 * 1024 * 1024)
    with pytest.raises(RcompError, match="header would be"):
        save(model, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), max_size=40), budget=st.integers(2000, 20000))
def test_bounded_history_property(sizes, budget):
    """Whatever the history, what is written fits the budget, keeps the newest entry when it can,
    and the counts of kept and dropped entries add up."""
    from rcomp.io.format import TRIMMED, bounded_history

    history = [{"command": "c", "i": i, "p": "x" * n} for i, n in enumerate(sizes)]
    out = bounded_history(history, budget)
    if out is history:
        return
    assert len(json.dumps(out)) <= budget
    dropped = next(h for h in out if h["command"] == TRIMMED)["params"]["dropped"]
    assert dropped + len(out) - 1 == len(history)
    if len(json.dumps(history[-1])) < budget // 2:
        assert out[-1] == history[-1]
