"""Deprecations rcomp's own calls still raise, each with its removal plan, and who gets to see them.

Maintainers see every deprecation: the test suite fails on a DeprecationWarning or FutureWarning
(or a warning whose text says "deprecated") raised while rcomp code is on the stack, unless
:data:`ALLOWED` names it with its removal plan (tests/conftest.py). Users of the command line are
spared them (they cannot act on them) unless they pass ``--debug`` or set ``RCOMP_SHOW_WARNINGS=1``;
the Python API shows them. The test suite turns :func:`maintainer_mode` on in its own process (not
through the environment, so the CLI subprocesses the tests start still behave as for users).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Allowed:
    #: regular expression searched in the warning's text
    pattern: str
    #: what rcomp uses it for, and when it goes
    plan: str

    def matches(self, text: str) -> bool:
        return re.search(self.pattern, text, flags=re.S) is not None


_TORCH_AO = ("torch.ao int8: the runtime of `--backend x86|fbgemm|qnnpack` (named explicitly, or the fallback where "
             "the default pt2e runtime cannot take a network), the loader of every torch.ao int8 file written so far, "
             "and the fake-quant twin (prepare_qat_fx, FakeQuantize) of every quantized model; removal plan: pt2e "
             "(oneDNN's int8 kernels, issue 24) is the default runtime and runs the same files (`rcomp quantize OLD "
             "--backend pt2e` moves one there); torch.ao stays to load old int8 files and for the twin until the twin "
             "moves to torchao's prepare_qat_pt2e (a new tensor layout, docs/quantization.md); drop it when torch "
             "removes torch.ao.quantization (announced for 2.10, still in 2.14.1)")
_LEGACY_ONNX = ("torch.onnx legacy (TorchScript) exporter: kept as `rcomp export --exporter legacy` because it exports "
                "5-15x faster here (the default is dynamo); removal plan: drop the option when torch removes the "
                "TorchScript exporter")

_TV_INIT = ("torchvision googlenet/inception_v3 default initialisation: rcomp builds them with torchvision's default "
            "(the same seeded weights as before); removal plan: when torchvision changes the default, record "
            "`init_weights` in the architecture's kwargs so seeded models stay reproducible")

#: the allow-list
ALLOWED: tuple[Allowed, ...] = (
    Allowed(r"The default weight initialization of (GoogleNet|inception_v3) will be changed", _TV_INIT),
    Allowed(r"torch\.ao\.quantization is deprecated", _TORCH_AO),
    Allowed(r"quantized tensor creation", _TORCH_AO),
    Allowed(r"legacy TorchScript-based ONNX export", _LEGACY_ONNX),
    Allowed(r"The feature will be removed\. Please remove usage of this function", _LEGACY_ONNX),
)

_spare_users = False
_maintainers = False


def allowed(text: str) -> Allowed | None:
    """The allow-list entry covering a warning's text, or None."""
    return next((a for a in ALLOWED if a.matches(str(text))), None)


def spare_users(value: bool) -> None:
    """Set by the command line: hide deprecations torch raises inside rcomp's calls (see the module doc)."""
    global _spare_users
    _spare_users = bool(value)


def maintainer_mode(value: bool = True) -> None:
    """Set by the test suite (in its own process only): never spare, so the tests see every deprecation."""
    global _maintainers
    _maintainers = bool(value)


def users_spared() -> bool:
    return _spare_users and not _maintainers and os.environ.get("RCOMP_SHOW_WARNINGS", "") in ("", "0")
