"""A hostile-input corpus at the file level (issue 15): every case is refused with one line.

Each case makes a hostile input (a lying header, metadata that asks for gigabytes, NaN weights,
a bad quantization scale, a FIFO, ``/dev/zero``, a pickle, a YAML bomb, an endless stdin...) and
runs one rcomp entry point on it. Every case must end in a one-line :class:`RcompError` naming
the problem, with no raw control character in the message, within a few seconds, with nothing
written or left behind in its folder and nothing imported or executed (a marker module and a
marker file watch for that). A few cases go through ``rcomp info`` and must exit 2 with one line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rcomp.errors import RcompError
from rcomp.io.serialize import serialize

from conftest import cpu_seconds, run_cli

EVIL = "rcomp_hostile_evil"
ESC = "\x1b[2J\x1b[31mPWNED\r"


@dataclass
class Base:
    """Valid files every case starts from."""

    plain: bytes      # mlp 1x4x4, hidden [5], 3 classes
    quant: bytes      # the same, real int8
    conv: bytes       # convnet8 1x8x8 with features.0 pruned to 16 channels
    folder: Path
    marker: Path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    import warnings

    from rcomp.models.loading import to_bytes
    from rcomp.models.registry import build_model
    from rcomp.quant.ptq import quantize

    torch.manual_seed(0)
    plain = build_model("mlp", 3, (1, 4, 4), kwargs={"hidden": [5]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant = quantize(plain, [torch.rand(8, 1, 4, 4)])
    conv = build_model("convnet8", 10, (1, 8, 8))
    keep = torch.arange(0, 32, 2)
    first, second = conv.net.features[0], conv.net.features[2]
    first.weight = torch.nn.Parameter(first.weight.data[keep].clone())
    first.bias = torch.nn.Parameter(first.bias.data[keep].clone())
    first.out_channels = 16
    second.weight = torch.nn.Parameter(second.weight.data[:, keep].clone())
    second.in_channels = 16
    folder = tmp_path_factory.mktemp("evil_pkg")
    marker = folder / "executed.marker"
    (folder / f"{EVIL}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
                                       "def f(**kw):\n    raise SystemExit(99)\n")
    return Base(to_bytes(plain), to_bytes(quant), to_bytes(conv), folder, marker)


# ------------------------------------------------------------------------------------------------
# building hostile files
# ------------------------------------------------------------------------------------------------

def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def pack(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def header_edit(edit: Callable[[dict], None], which: str = "plain"):
    def make(tmp: Path, b: Base) -> Path:
        header, body = split(getattr(b, which))
        edit(header)
        return write(tmp, pack(header, body))
    return make


def meta(which: str = "plain", **fields):
    """Metadata fields replaced by the given raw strings (None removes the field)."""
    def edit(header):
        for k, v in fields.items():
            if v is None:
                header["__metadata__"].pop(f"rcomp.{k}", None)
            else:
                header["__metadata__"][f"rcomp.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return header_edit(edit, which)


def meta_json(which: str, field: str, change: Callable[[dict], None]):
    """A JSON metadata field changed in place by ``change``."""
    def edit(header):
        doc = json.loads(header["__metadata__"][f"rcomp.{field}"])
        change(doc)
        header["__metadata__"][f"rcomp.{field}"] = json.dumps(doc)
    return header_edit(edit, which)


def arch(name="mlp", **kwargs):
    return meta(arch=json.dumps({"name": name, "kwargs": kwargs or {"hidden": [5]}}))


def tensors_edit(change: Callable[[dict], None], which: str = "plain"):
    def make(tmp: Path, b: Base) -> Path:
        from safetensors.torch import load

        data = getattr(b, which)
        tensors = load(data)
        change(tensors)
        return write(tmp, serialize(tensors, split(data)[0]["__metadata__"]))
    return make


def setitem(key, fn):
    def change(t):
        t[key] = fn(t[key]) if key in t else fn(None)
    return change


def entry_edit(name: str, **changes):
    def edit(header):
        header[name].update(changes)
    return header_edit(edit)


def raw(data: bytes | Callable[[Base], bytes]):
    return lambda tmp, b: write(tmp, data(b) if callable(data) else data)


def write(tmp: Path, data: bytes, name: str = "in.safetensors") -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def fifo(tmp: Path, b: Base) -> Path:
    os.mkfifo(tmp / "fifo.safetensors")
    return tmp / "fifo.safetensors"


def symlink_to(target: str | Callable[[Path, Base], Path]):
    def make(tmp: Path, b: Base) -> Path:
        dest = target(tmp, b) if callable(target) else Path(target)
        (tmp / "link.safetensors").symlink_to(dest)
        return tmp / "link.safetensors"
    return make


def symlink_loop(tmp: Path, b: Base) -> Path:
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    return tmp / "a"


def directory(tmp: Path, b: Base) -> Path:
    (tmp / "dir.safetensors").mkdir()
    return tmp / "dir.safetensors"


class _Reduce:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(tmp: Path, b: Base) -> Path:
    return write(tmp, pickle.dumps({"w": _Reduce(b.marker)}, protocol=2), "evil.pth")


def torch_file(zip_format: bool):
    def make(tmp: Path, b: Base) -> Path:
        p = tmp / "model.pth"
        torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=zip_format)
        return p
    return make


def zip_file(tmp: Path, b: Base) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.pkl", b"not really")
    return write(tmp, buf.getvalue())


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def no_tensor(key):
    return lambda t: t.pop(key)


def quant_scale(value: float, key: str = "net.layers.1.weight_fake_quant.scale"):
    return tensors_edit(setitem(key, lambda t: torch.full_like(t, value)), "quant")


def qmeta(**changes):
    return meta_json("quant", "compression", lambda d: d["quantization"].update(changes))


def structure(value):
    return meta(which="conv", compression=json.dumps({"structure": value}))


def _convnet_widths(tmp: Path, b: Base) -> Path:
    header, body = split(b.conv)
    header["__metadata__"]["rcomp.arch"] = json.dumps({"name": "convnet8", "kwargs": {"widths": [10**6] * 6}})
    return write(tmp, pack(header, body))


# ------------------------------------------------------------------------------------------------
# the corpus: (id, make input, what to run, words the one-line message must contain)
# ------------------------------------------------------------------------------------------------

LOAD, YAML, CONVERT, CLI, SAVE, STDIN = "load", "yaml", "convert", "cli", "save", "stdin"
W = "layers.1.weight"

CASES = [
    # --- not a safetensors file / the header lies -------------------------------------------------
    ("empty", raw(b""), LOAD, "not a safetensors file"),
    ("seven-bytes", raw(b"\x01" * 7), LOAD, "only 7 bytes"),
    ("header-len-0", raw(struct.pack("<Q", 0) + b"{}"), LOAD, "header length 0"),
    ("header-len-2^63", raw(struct.pack("<Q", 2**63) + b"{}"), LOAD, "header length"),
    ("header-len-17MiB", raw(struct.pack("<Q", 17 << 20) + b"{}"), LOAD, "header length"),
    # a real safetensors file whose metadata (a 100k-entry history) outgrows the cap: not "check the path"
    ("header-17MiB-real", raw(struct.pack("<Q", 17 << 20) + b"{" + b" " * ((17 << 20) - 2) + b"}"), LOAD,
     "has a safetensors header of 17,825,792 bytes, more than the 16,777,216 rcomp reads"),
    ("header-past-end", raw(struct.pack("<Q", 4096) + b"{}"), LOAD, "truncated"),
    ("header-not-utf8", raw(pack(b"{\xff\xfe}", b"")), LOAD, "not json"),
    ("header-list", raw(pack(b"[1, 2]", b"")), LOAD, "not a safetensors file"),
    ("header-truncated-json", raw(pack(b'{"a": 1', b"")), LOAD, "not json"),
    ("header-deep-nesting", raw(pack(b'{"a": ' + nested_json(100_000) + b"}", b"")), LOAD, "not json"),
    ("header-5000-digit-int", raw(pack(b'{"a": ' + b"9" * 5000 + b"}", b"")), LOAD, "not json"),
    ("header-nan-literal", raw(pack(b'{"x": NaN}', b"")), LOAD, "not an object"),
    ("metadata-not-dict", header_edit(lambda h: h.update(__metadata__=[1])), LOAD, "malformed metadata"),
    ("metadata-value-int", header_edit(lambda h: h["__metadata__"].update(x=1)), LOAD, "malformed metadata"),
    ("entry-not-object", header_edit(lambda h: h.update(x=[1])), LOAD, "not an object"),
    ("dtype-unknown", entry_edit(f"net.{W}", dtype="F128"), LOAD, "unsupported dtype"),
    ("dtype-list", entry_edit(f"net.{W}", dtype=["F32"]), LOAD, "unsupported dtype"),
    ("dtype-escape", entry_edit(f"net.{W}", dtype=ESC), LOAD, "unsupported dtype"),
    ("shape-negative", entry_edit(f"net.{W}", shape=[-5, 16]), LOAD, "invalid shape"),
    ("shape-9-dims", entry_edit(f"net.{W}", shape=[1] * 9), LOAD, "invalid shape"),
    ("shape-2^41", entry_edit(f"net.{W}", shape=[2**41]), LOAD, "invalid shape"),
    ("shape-bool", entry_edit(f"net.{W}", shape=[True, 16]), LOAD, "invalid shape"),
    ("shape-string", entry_edit(f"net.{W}", shape="5,16"), LOAD, "invalid shape"),
    ("offsets-one", entry_edit(f"net.{W}", data_offsets=[0]), LOAD, "invalid data offsets"),
    ("offsets-negative", entry_edit(f"net.{W}", data_offsets=[-8, 312]), LOAD, "outside the file"),
    ("offsets-past-end", entry_edit(f"net.{W}", data_offsets=[0, 10**9]), LOAD, "outside the file"),
    ("offsets-float", entry_edit(f"net.{W}", data_offsets=[0.0, 320.0]), LOAD, "invalid data offsets"),
    ("size-mismatch", entry_edit(f"net.{W}", shape=[5, 15]), LOAD, "does not match"),
    ("overlap", entry_edit("normalize.std", data_offsets=[0, 4]), LOAD, "overlap"),
    ("data-cut", raw(lambda b: b.plain[:-1]), LOAD, "outside the file"),
    ("half-file", raw(lambda b: b.plain[: len(b.plain) // 2]), LOAD, "truncated"),
    ("torch-zip", torch_file(True), LOAD, "it is a PyTorch file: make a checkpoint with rcomp convert"),
    ("torch-legacy-pickle", torch_file(False), LOAD, "it is a PyTorch file"),
    ("evil-pickle", evil_pickle, LOAD, "rcomp convert"),
    ("zip-archive", zip_file, LOAD, "not an rcomp checkpoint"),
    ("gzip", raw(b"\x1f\x8b\x08\x00" + b"\x00" * 64), LOAD, "not a safetensors file"),
    ("png", raw(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), LOAD, "not a safetensors file"),
    ("yaml-text", raw(b"stages:\n  - name: x\n"), LOAD, "not a safetensors file"),
    # --- not a regular file ---------------------------------------------------------------------
    ("fifo", fifo, LOAD, "fifo"),
    ("dev-zero", lambda t, b: Path("/dev/zero"), LOAD, "character device"),
    ("dev-null", lambda t, b: Path("/dev/null"), LOAD, "character device"),
    ("dev-urandom", lambda t, b: Path("/dev/urandom"), LOAD, "character device"),
    ("directory", directory, LOAD, "directory"),
    ("symlink-to-fifo", symlink_to(fifo), LOAD, "fifo"),
    ("symlink-to-dev-zero", symlink_to("/dev/zero"), LOAD, "character device"),
    ("symlink-loop", symlink_loop, LOAD, "symlink loop"),
    ("dangling-symlink", symlink_to("/nonexistent/x.safetensors"), LOAD, "does not exist"),
    ("missing", lambda t, b: t / "missing.safetensors", LOAD, "does not exist"),
    ("proc-file", lambda t, b: Path("/proc/self/status"), LOAD, "not a safetensors file"),
    # --- the metadata schema --------------------------------------------------------------------
    ("no-rcomp-metadata", meta(format=None), LOAD, "not an rcomp checkpoint"),
    ("format-9", meta(format="9"), LOAD, "upgrade rcomp"),
    ("format-abc", meta(format="abc"), LOAD, "malformed format"),
    ("format-0", meta(format="0"), LOAD, "unknown checkpoint format"),
    ("format-escape", meta(format=ESC), LOAD, "malformed format"),
    ("format-huge", meta(format="9" * 5000), LOAD, "malformed format"),
    ("arch-not-json", meta(arch="{oops"), LOAD, "rcomp.arch"),
    ("arch-list", meta(arch=[1]), LOAD, "rcomp.arch"),
    ("arch-no-name", meta(arch={"kwargs": {}}), LOAD, "rcomp.arch"),
    ("arch-empty-name", meta(arch={"name": "", "kwargs": {}}), LOAD, "rcomp.arch"),
    ("arch-int-name", meta(arch={"name": 5, "kwargs": {}}), LOAD, "rcomp.arch"),
    ("arch-kwargs-list", meta(arch={"name": "mlp", "kwargs": [1]}), LOAD, "rcomp.arch"),
    ("arch-deep-json", meta(arch=nested_json(50_000).decode()), LOAD, "rcomp.arch"),
    ("arch-unknown", arch("no_such_net"), LOAD, "unknown architecture"),
    ("arch-escape", arch("res" + ESC), LOAD, "architecture"),
    ("arch-os-system", arch("os:system"), LOAD, "never imports code"),
    ("arch-evil-module", arch(f"{EVIL}:f"), LOAD, "never imports code"),
    ("arch-path-traversal", arch("../x:y"), LOAD, "not a registered name"),
    ("arch-builtins-exec", arch("builtins:exec"), LOAD, "never imports code"),
    ("arch-bad-kwarg", arch(bogus=1), LOAD, "takes no option 'bogus'"),
    ("arch-hidden-string", arch(hidden=["a"]), LOAD, "bad arguments"),
    ("arch-hidden-negative", arch(hidden=[-5]), LOAD, "cannot be loaded"),
    ("arch-hidden-1e9", arch(hidden=[10**9]), LOAD, "values"),
    ("arch-hidden-1e30", arch(hidden=[10**30]), LOAD, "mlp"),
    ("arch-hidden-float", arch(hidden=[1e308]), LOAD, "mlp"),
    ("arch-100k-layers", arch(hidden=[1] * 100_000), LOAD, "modules"),
    ("arch-convnet-widths-huge", _convnet_widths, LOAD, "values"),
    ("arch-torchvision-grey", arch("resnet18"), LOAD, "3-channel"),
    ("arch-torchvision-kwargs", meta(arch={"name": "resnet18", "kwargs": {"width_per_group": 10**6}},
                                     input={"channels": 3, "height": 8, "width": 8, "mean": [0] * 3,
                                            "std": [1] * 3}), LOAD, "resnet18"),
    ("input-not-json", meta(input="{"), LOAD, "rcomp.input"),
    ("input-missing", meta(input=None), LOAD, "rcomp.input"),
    ("input-channels-0", meta_json("plain", "input", lambda d: d.update(channels=0)), LOAD, "channels"),
    ("input-channels-1e6", meta_json("plain", "input", lambda d: d.update(channels=10**6)), LOAD, "channels"),
    ("input-65536-square", meta_json("plain", "input", lambda d: d.update(height=65536, width=65536)), LOAD,
     "over the limits"),
    ("input-height-string", meta_json("plain", "input", lambda d: d.update(height="8")), LOAD, "height"),
    ("input-mean-length", meta_json("plain", "input", lambda d: d.update(mean=[0, 0])), LOAD, "mean and std"),
    ("input-std-zero", meta_json("plain", "input", lambda d: d.update(std=[0])), LOAD, "positive"),
    ("input-mean-nan", meta(input='{"channels": 1, "height": 4, "width": 4, "mean": [NaN], "std": [1]}'), LOAD,
     "finite"),
    ("input-std-inf", meta(input='{"channels": 1, "height": 4, "width": 4, "mean": [0], "std": [Infinity]}'),
     LOAD, "finite"),
    ("input-range-255", meta_json("plain", "input", lambda d: d.update(range=[0, 255])), LOAD, "range"),
    ("input-disagrees-with-tensor", meta_json("plain", "input", lambda d: d.update(mean=[0.5])), LOAD,
     "disagrees"),
    ("classes-not-json", meta(classes="[["), LOAD, "rcomp.classes"),
    ("classes-zero", meta(classes={"num_classes": 0}), LOAD, "classes"),
    ("classes-bool", meta(classes={"num_classes": True}), LOAD, "classes"),
    ("classes-1e9", meta(classes={"num_classes": 10**9}), LOAD, "over the limit"),
    ("classes-1000-lie", meta(classes={"num_classes": 1000}), LOAD, "shape"),
    ("class-names-length", meta(classes={"num_classes": 3, "names": ["a"]}), LOAD, "class names"),
    ("class-names-ints", meta(classes={"num_classes": 3, "names": [1, 2, 3]}), LOAD, "class names"),
    ("dataset-int", meta(dataset="5"), LOAD, "rcomp.dataset"),
    ("compression-list", meta(compression="[]"), LOAD, "rcomp.compression"),
    ("history-dict", meta(history={"a": 1}), LOAD, "rcomp.history"),
    ("history-ints", meta(history=[1, 2]), LOAD, "rcomp.history"),
    ("stats-list", meta(stats=[1]), LOAD, "rcomp.stats"),
    # --- pruned structure against the tensors ---------------------------------------------------
    ("structure-not-object", structure([1]), LOAD, "structure must be an object"),
    ("structure-unknown-module", structure({"features.99": {"out_channels": 3}}), LOAD, "features.99"),
    ("structure-escape-module", structure({ESC: {"out_channels": 3}}), LOAD, "does not have"),
    ("structure-forward-attr", structure({"features.0": {"forward": 3}}), LOAD, "unknown attribute"),
    ("structure-dunder-attr", structure({"features.0": {"__class__": 3}}), LOAD, "unknown attribute"),
    ("structure-zero", structure({"features.0": {"out_channels": 0}}), LOAD, "invalid value"),
    ("structure-negative", structure({"features.0": {"out_channels": -3}}), LOAD, "invalid value"),
    ("structure-2^40", structure({"features.0": {"out_channels": 2**40}}), LOAD, "invalid value"),
    ("structure-string", structure({"features.0": {"out_channels": "16"}}), LOAD, "invalid value"),
    ("structure-entry-list", structure({"features.0": [16]}), LOAD, "malformed"),
    ("structure-contradicts-tensor", structure({"features.0": {"out_channels": 8}}), LOAD, "contradicts"),
    ("structure-groups-indivisible", structure({"features.0": {"out_channels": 16, "groups": 3}}), LOAD,
     "divisible"),
    ("structure-missing", structure({}), LOAD, "shape"),
    ("structure-next-layer-not-resized", structure({"features.0": {"out_channels": 16},
                                                    "features.2": {"in_channels": 32}}), LOAD, "contradicts"),
    # --- quantization state ---------------------------------------------------------------------
    ("quant-mode-unknown", qmeta(mode="int3"), LOAD, "unknown quantization mode"),
    ("quant-bits-3-int8", qmeta(bits=3), LOAD, "bits"),
    ("quant-bits-string", qmeta(bits="8"), LOAD, "bits"),
    ("quant-backend", qmeta(backend="cuda"), LOAD, "backend"),
    ("quant-float-shapes-huge", qmeta(float_shapes={"layers.1.weight": [100000, 100000]}), LOAD,
     "larger than any tensor"),
    ("quant-float-shapes-list", qmeta(float_shapes=[1]), LOAD, "float_shapes"),
    ("quant-not-object", meta(which="quant", compression={"quantization": [1]}), LOAD, "must be an object"),
    ("quant-scale-zero", quant_scale(0.0), LOAD, "scale"),
    ("quant-scale-negative", quant_scale(-0.5), LOAD, "scale"),
    ("quant-scale-nan", quant_scale(float("nan")), LOAD, "nan"),
    ("quant-scale-inf", quant_scale(float("inf")), LOAD, "infinite"),
    ("quant-act-scale-zero", quant_scale(0.0, "net.activation_post_process_1.scale"), LOAD, "scale"),
    ("quant-int-weights-missing", tensors_edit(no_tensor("net.layers.1.weight_q"), "quant"), LOAD, "layers"),
    ("quant-extra-tensor", tensors_edit(setitem("evil", lambda _: torch.zeros(1)), "quant"), LOAD, "evil"),
    # --- the tensors ----------------------------------------------------------------------------
    ("weights-nan", tensors_edit(setitem(f"net.{W}", lambda t: t.index_fill(0, torch.tensor([1]), float("nan")))),
     LOAD, f"net.{W}"),
    ("weights-inf", tensors_edit(setitem("net.layers.3.bias", lambda t: t.fill_(float("inf")))), LOAD, "infinite"),
    ("normalize-nan", tensors_edit(setitem("normalize.std", lambda t: t.fill_(float("nan")))), LOAD, "nan"),
    ("dtype-f64", tensors_edit(setitem(f"net.{W}", lambda t: t.double())), LOAD, "dtype"),
    ("dtype-i64", tensors_edit(setitem(f"net.{W}", lambda t: t.long())), LOAD, "dtype"),
    ("dtype-f16", tensors_edit(setitem(f"net.{W}", lambda t: t.half())), LOAD, "dtype"),
    ("tensor-missing", tensors_edit(no_tensor(f"net.{W}")), LOAD, "missing"),
    ("tensor-extra", tensors_edit(setitem("net.extra", lambda _: torch.zeros(2))), LOAD, "unexpected"),
    ("tensor-escape-name", tensors_edit(setitem("net." + ESC, lambda _: torch.zeros(2))), LOAD, "unexpected"),
    ("tensor-shape", tensors_edit(setitem(f"net.{W}", lambda t: torch.zeros(5, 17))), LOAD, "shape"),
    ("tensor-scalar", tensors_edit(setitem("net.layers.3.bias", lambda t: torch.tensor(1.0))), LOAD, "shape"),
    ("arch-swapped", arch("convnet8", hidden=5), LOAD, "do not fit"),
    ("normalize-shape", tensors_edit(setitem("normalize.mean", lambda t: torch.zeros(3))), LOAD, "shape"),
    # --- the command line (rcomp info) ----------------------------------------------------------
    ("cli-fifo", fifo, CLI, "fifo"),
    ("cli-dev-zero", lambda t, b: Path("/dev/zero"), CLI, "character device"),
    ("cli-torch-file", torch_file(True), CLI, "rcomp convert"),
    ("cli-truncated", raw(lambda b: b.plain[:100]), CLI, "truncated"),
    ("cli-format-escape", meta(format=ESC), CLI, "malformed format"),
    ("cli-directory", directory, CLI, "directory"),
    # --- converting PyTorch files -------------------------------------------------------------
    ("convert-evil-pickle", evil_pickle, CONVERT, "never unpickles"),
    ("convert-fifo", fifo, CONVERT, "fifo"),
    ("convert-dev-zero", lambda t, b: Path("/dev/zero"), CONVERT, "character device"),
    ("convert-directory", directory, CONVERT, "directory"),
    ("convert-random", raw(os.urandom(512)), CONVERT, "neither safetensors"),
]


# --- issue 22: values that used to end in an internal error ---------------------------------------
CASES += [
    ("format-superscript-digit", meta(format="\u00b2"), LOAD, "malformed format version"),
    ("format-arabic-digit", meta(format="\u0661"), CLI, "malformed format version"),
    ("history-params-a-list", meta(history=[{"command": "finetune", "params": [1, 2]}]), CLI,
     "history entry 1: its params is list"),
    ("history-metrics-a-string", meta(history=[{"command": "finetune", "metrics": "abc"}]), LOAD,
     "its metrics is str"),
    ("history-command-a-number", meta(history=[{"command": 5}]), LOAD, "its command is int"),
    ("quant-weight-scale-short", tensors_edit(setitem("net.layers.1.weight_fake_quant.scale",
                                                      lambda t: t[:-1].clone()), "quant"), LOAD, "has shape"),
    ("quant-weight-scale-scalar", tensors_edit(setitem("net.layers.1.weight_fake_quant.scale",
                                                       lambda t: t[0].clone()), "quant"), LOAD, "has shape"),
    ("quant-zero-point-long", tensors_edit(setitem("net.layers.1.weight_fake_quant.zero_point",
                                                   lambda t: torch.cat([t, t])), "quant"), LOAD, "zero_point"),
    ("quant-act-scale-two", tensors_edit(setitem("net.activation_post_process_1.scale",
                                                 lambda t: torch.cat([t, t])), "quant"), LOAD, "has shape"),
    # issue 24: values the int8 kernels would have computed with silently
    ("quant-act-zero-point-300", tensors_edit(setitem("net.activation_post_process_1.zero_point",
                                                      lambda t: torch.full_like(t, 300)), "quant"), LOAD,
     "outside its integer range"),
    ("quant-weights-minus-128", tensors_edit(setitem("net.layers.1.weight_q", lambda t: torch.full_like(t, -128)),
                                             "quant"), LOAD, "outside their range [-127, 127]"),
]


# --- YAML through rcomp.safeyaml -------------------------------------------------------------------

def yaml_file(text: str | bytes):
    return lambda tmp, b: write(tmp, text.encode() if isinstance(text, str) else text, "c.yaml")


def laughs(levels: int = 9, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


CASES += [
    ("yaml-billion-laughs", yaml_file(laughs()), YAML, "alias"),
    ("yaml-wide-laughs", yaml_file(laughs(4, 400)), YAML, "expands"),
    ("yaml-merge-bomb", yaml_file("a: &a {x: 1, y: 2}\n" + "".join(
        f"b{i}: &b{i}\n  <<: [{', '.join([f'*b{i - 1}' if i else '*a'] * 1)}]\n  k{i}: [" + ", ".join(
            [f"*b{i - 1}" if i else "*a"] * 12) + "]\n" for i in range(8))), YAML, "expands"),
    ("yaml-recursive-alias", yaml_file("a: &a [*a]\n"), YAML, "recursive"),
    ("yaml-deep-lists", yaml_file("[" * 10_000 + "]" * 10_000), YAML, "nesting"),
    ("yaml-deep-maps", yaml_file("".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "v\n"),
     YAML, "nesting"),
    ("yaml-python-object", yaml_file("x: !!python/object/apply:os.system ['touch /tmp/rcomp-hostile']\n"), YAML,
     "not valid yaml"),
    ("yaml-python-name", yaml_file(f"x: !!python/name:{EVIL}.f\n"), YAML, "not valid yaml"),
    ("yaml-python-module", yaml_file(f"x: !!python/module:{EVIL}\n"), YAML, "not valid yaml"),
    ("yaml-too-big", yaml_file("a: " + "x" * (1 << 21) + "\n"), YAML, "over the limit"),
    ("yaml-many-values", yaml_file("[" + "1," * 150_000 + "1]"), YAML, "expands"),
    ("yaml-fifo", fifo, YAML, "fifo"),
    ("yaml-dev-zero", lambda t, b: Path("/dev/zero"), YAML, "character device"),
    ("yaml-directory", directory, YAML, "directory"),
    ("yaml-not-utf8", yaml_file(b"a: \xff\xfe\n"), YAML, "not utf-8"),
    ("yaml-5000-digits", yaml_file("a: " + "9" * 5000 + "\n"), YAML, "cannot be read"),
    ("yaml-broken", yaml_file("a: [1, 2\n"), YAML, "not valid yaml"),
    ("yaml-two-documents", yaml_file("a: 1\n---\nb: 2\n"), YAML, "not valid yaml"),
    ("yaml-escape-key", yaml_file('"\\e[31m": [\n'), YAML, "not valid yaml"),
    ("yaml-symlink-loop", symlink_loop, YAML, "symlink loop"),
]


# --- writing: hostile output paths ----------------------------------------------------------------

def output(make_target: Callable[[Path, Base], Path], force: bool = True):
    def make(tmp: Path, b: Base):
        return make_target(tmp, b), force
    return make


def existing(tmp: Path, b: Base) -> Path:
    return write(tmp, b"keep me", "exists.safetensors")


def dangling(tmp: Path, b: Base) -> Path:
    (tmp / "dangling.safetensors").symlink_to(tmp / "nowhere")
    return tmp / "dangling.safetensors"


CASES += [
    ("save-over-fifo-forced", output(fifo), SAVE, "rcomp replaces only regular files"),
    ("save-over-dev-null-forced", output(lambda t, b: Path("/dev/null")), SAVE, "character device"),
    ("save-over-directory-forced", output(directory), SAVE, "directory"),
    ("save-over-symlink-to-fifo", output(symlink_to(fifo)), SAVE, "fifo"),
    ("save-over-symlink-to-dev-zero", output(symlink_to("/dev/zero")), SAVE, "character device"),
    ("save-over-existing", output(existing, force=False), SAVE, "force=True"),
    ("save-over-dangling-symlink", output(dangling, force=False), SAVE, "already exists"),
    ("save-into-missing-folder", output(lambda t, b: t / "no" / "x.safetensors"), SAVE, "does not exist"),
    ("save-into-a-file-as-folder", output(lambda t, b: existing(t, b) / "x.safetensors"), SAVE,
     "not a directory"),
]


# --- stdin where a path is expected -------------------------------------------------------------

class Endless(io.RawIOBase):
    """An stdin that never ends (like ``yes`` or ``/dev/zero``)."""

    def __init__(self, byte: bytes = b"y\n"):
        self.byte = byte

    def readable(self):
        return True

    def read(self, n=-1):
        if n is None or n < 0:
            raise AssertionError("an endless stream was read without a bound")
        return (self.byte * (n // len(self.byte) + 1))[:n]


class Stdin:
    def __init__(self, raw_stream):
        self.buffer = raw_stream


CASES += [
    ("stdin-endless-yes", lambda t, b: Stdin(Endless()), STDIN, "more than"),
    ("stdin-dev-zero", lambda t, b: Stdin(Endless(b"\x00")), STDIN, "more than"),
    ("stdin-binary", lambda t, b: Stdin(io.BytesIO(b"a\x00b\n")), STDIN, "binary"),
    ("stdin-too-many-lines", lambda t, b: Stdin(io.BytesIO(b"x\n" * 5000)), STDIN, "lines"),
    ("stdin-text-endless", lambda t, b: io.StringIO("p\n" * 100_000), STDIN, "more than"),
]


# ------------------------------------------------------------------------------------------------
# running a case
# ------------------------------------------------------------------------------------------------

def _run(kind: str, target, b: Base):
    from rcomp.io.bounded import read_stdin_lines
    from rcomp.models.convert import read_state_dict
    from rcomp.models.loading import load
    from rcomp.safeyaml import load_yaml_file

    if kind == LOAD:
        return load(target)
    if kind == YAML:
        return load_yaml_file(target, what="config file")
    if kind == CONVERT:
        return read_state_dict(target)
    if kind == STDIN:
        return read_stdin_lines(target)
    if kind == SAVE:
        from rcomp.models.loading import save
        from rcomp.models.registry import build_model

        path, force = target
        return save(build_model("mlp", 3, (1, 4, 4)), path, force=force)
    raise AssertionError(kind)


def _snapshot(folder: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _assert_one_line(message: str, needle: str) -> None:
    lines = message.strip().splitlines()
    assert len(lines) == 1, message
    assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert not any(ord(ch) < 0x20 or 0x7f <= ord(ch) <= 0x9f for ch in lines[0]), repr(lines[0])
    assert "Traceback" not in message and len(lines[0]) < 1000


def test_corpus_is_large_and_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 150


@pytest.mark.parametrize("case_id,make,kind,needle", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_one_line(tmp_path, monkeypatch, base, case_id, make, kind, needle):
    monkeypatch.syspath_prepend(str(base.folder))
    work = tmp_path / "work"
    work.mkdir()
    target = make(work, base)
    before = _snapshot(work)
    dev_null = os.stat("/dev/null")
    t0 = cpu_seconds()
    if kind == CLI:
        res = run_cli("info", target)
        assert res.code == 2 and res.stdout == "", res
        _assert_one_line(res.stderr, needle)
        assert res.stderr.startswith("rcomp: error:")
    else:
        with pytest.raises(RcompError) as info:
            _run(kind, target, base)
        _assert_one_line(str(info.value), needle)
    assert cpu_seconds() - t0 < 5.0
    assert _snapshot(work) == before, "something was written or left behind"
    assert EVIL not in sys.modules and not base.marker.exists(), "hostile input imported or ran code"
    assert not Path("/tmp/rcomp-hostile").exists()
    assert os.stat("/dev/null").st_ino == dev_null.st_ino


def test_valid_inputs_still_load(base, tmp_path):
    """The corpus starts from files that load: a refusal above is caused by the hostile change."""
    from rcomp.models.loading import load

    for which in ("plain", "quant", "conv"):
        assert load(write(tmp_path, getattr(base, which), f"{which}.safetensors")).meta.num_classes in (3, 10)


def test_printable_and_shell_quote():
    from rcomp.text import printable, shell_quote

    assert printable(ESC) == "\\x1b[2J\\x1b[31mPWNED\\r"
    assert printable("a\x00b\x7fc\x9bd\u202e") == "a\\x00b\\x7fc\\x9bd\\u202e"
    assert printable("ok name é") == "ok name é"
    assert printable("x" * 500, limit=10) == "xxxxxxx..."
    assert shell_quote(["rcomp", "prune", "my model.safetensors", "--ratio", "0.5"]) == \
        "rcomp prune 'my model.safetensors' --ratio 0.5"
    assert shell_quote(["a;rm -rf /", "$(x)"]) == "'a;rm -rf /' '$(x)'"
    assert "\x1b" not in shell_quote([ESC])


def test_stdin_paths_are_read_when_bounded():
    from rcomp.io.bounded import read_stdin_lines

    assert read_stdin_lines(Stdin(io.BytesIO(b"\n a.safetensors \nb.safetensors\n"))) == ["a.safetensors",
                                                                                          "b.safetensors"]
    assert read_stdin_lines(io.StringIO("x\n")) == ["x"]


def test_lone_surrogates_in_metadata_are_escaped_not_a_crash(base, tmp_path):
    """Class names and history holding lone UTF-16 surrogates (JSON '\\ud800') print escaped; exit 0."""
    path = meta(classes={"num_classes": 3, "names": ["\ud800a", "b\udfff", "c"]},
                history=[{"command": "finetune", "params": {"note": "\udc80x"}}])(tmp_path, base)
    res = run_cli("info", path)
    assert res.code == 0, res.stderr
    assert "\\ud800a" in res.stdout and "\ud800" not in res.stdout
    res = run_cli("info", path, "--json")
    assert res.code == 0 and json.loads(res.stdout)
