"""Hostile and broken checkpoints: every case is refused with RcompError (exit 2, one line),
nothing is imported, nothing is written, nothing hangs.

Thousands of generated cases per run (hypothesis), kept fast by fuzzing the header parser,
metadata schema and loader in-process.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcomp.errors import RcompError
from rcomp.io.header import read_header
from rcomp.models.loading import load

from conftest import make_checkpoint, run_cli

FUZZ = settings(max_examples=600, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    p = make_checkpoint(tmp_path_factory.mktemp("valid") / "v.safetensors", "mlp", (1, 4, 4),
                        num_classes=3, kwargs={"hidden": [5]})
    return p.read_bytes()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check_refused_or_loaded(path: Path, folder: Path) -> None:
    """The only allowed outcomes: a loaded model, or RcompError. No other exception, no new files."""
    before_files = sorted(folder.iterdir())
    before_mods = set(sys.modules)
    try:
        load(path)
    except RcompError as exc:
        msg = str(exc).strip()
        assert msg and len(msg.splitlines()) == 1, msg
    new_mods = {m for m in set(sys.modules) - before_mods if not m.startswith(("torch", "safetensors"))}
    assert not new_mods, new_mods
    assert sorted(folder.iterdir()) == before_files


def _split(valid: bytes):
    (n,) = struct.unpack("<Q", valid[:8])
    return json.loads(valid[8:8 + n]), valid[8 + n:]


def _pack(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@FUZZ
@given(cut=st.integers(0, 10_000))
def test_truncated_files(valid, work, cut):
    p = work / "t.safetensors"
    p.write_bytes(valid[: cut % len(valid)])
    _check_refused_or_loaded(p, work)


@FUZZ
@given(data=st.binary(min_size=0, max_size=600))
def test_random_bytes(work, data):
    p = work / "r.safetensors"
    p.write_bytes(data)
    with pytest.raises(RcompError):
        load(p)


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096)), rest=st.binary(max_size=200))
def test_lying_header_length(work, length, rest):
    p = work / "l.safetensors"
    p.write_bytes(struct.pack("<Q", length) + b'{"__metadata__": {}}' + rest)
    with pytest.raises(RcompError):
        load(p)


@FUZZ
@given(pos=st.integers(0, 100_000), byte=st.integers(0, 255))
def test_flipped_bytes(valid, work, pos, byte):
    b = bytearray(valid)
    b[pos % len(b)] = byte
    p = work / "f.safetensors"
    p.write_bytes(bytes(b))
    _check_refused_or_loaded(p, work)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(name=st.sampled_from(["n.0.weight", "net.layers.1.weight", "normalize.mean"]),
       dtype=st.one_of(st.sampled_from(["F32", "F16", "I64", "U8", "BOOL", "F64"]), st.text(max_size=5)),
       shape=st.one_of(st.lists(st.integers(-3, 2**41), max_size=5), json_values),
       offsets=st.one_of(st.lists(st.integers(-10, 2**33), min_size=0, max_size=3), json_values))
def test_wrong_dtypes_shapes_offsets(valid, work, name, dtype, shape, offsets):
    header, data = _split(valid)
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    p = work / "d.safetensors"
    p.write_bytes(_pack(header, data))
    _check_refused_or_loaded(p, work)


@FUZZ
@given(a=st.sampled_from(["net.layers.1.weight", "net.layers.1.bias", "net.layers.3.weight"]),
       start=st.integers(0, 400), end=st.integers(0, 400))
def test_overlapping_or_past_end_offsets(valid, work, a, start, end):
    header, data = _split(valid)
    header[a]["data_offsets"] = [start, end]
    p = work / "o.safetensors"
    p.write_bytes(_pack(header, data))
    _check_refused_or_loaded(p, work)


@FUZZ
@given(field=st.sampled_from(["format", "arch", "input", "classes", "dataset", "compression", "history", "stats"]),
       value=st.one_of(json_values.map(json.dumps), st.text(max_size=40), st.none()))
def test_malformed_metadata(valid, work, field, value):
    header, data = _split(valid)
    meta = header["__metadata__"]
    if value is None:
        meta.pop(f"rcomp.{field}", None)
    else:
        meta[f"rcomp.{field}"] = value
    p = work / "m.safetensors"
    p.write_bytes(_pack(header, data))
    _check_refused_or_loaded(p, work)


@settings(max_examples=200, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(target=st.sampled_from(["os:system", "subprocess:run", "/tmp/evil.py:main", "evil_mod_x:f",
                                "builtins:exec", "importlib:import_module", "../x:y", "rcomp.cli:main"]),
       kwargs=st.dictionaries(st.text(max_size=5), json_values, max_size=3))
def test_metadata_naming_code_is_never_imported(valid, work, target, kwargs):
    header, data = _split(valid)
    header["__metadata__"]["rcomp.arch"] = json.dumps({"name": target, "kwargs": kwargs})
    p = work / "c.safetensors"
    p.write_bytes(_pack(header, data))
    before = set(sys.modules)
    with pytest.raises(RcompError):
        load(p)
    assert not (set(sys.modules) - before), set(sys.modules) - before


def test_enormous_metadata_is_refused_before_reading(work):
    p = work / "big.safetensors"
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", 64 * 1024 * 1024))
        fh.write(b'{"__metadata__": {"rcomp.history": "' + b"x" * 1000 + b'"}}')
    with pytest.raises(RcompError, match="header length"):
        read_header(p)


@settings(max_examples=150, deadline=3000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(pos=st.integers(0, 100_000), byte=st.integers(0, 255))
def test_cli_always_exit_0_or_2_with_one_line(valid, work, pos, byte):
    b = bytearray(valid)
    b[pos % len(b)] = byte
    p = work / "cli.safetensors"
    p.write_bytes(bytes(b))
    res = run_cli("info", p, "--json")
    assert res.code in (0, 2), res
    if res.code == 2:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rcomp: error:"), res.stderr
