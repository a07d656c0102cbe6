"""The combination matrix of issue 22: model kinds x commands x ways of calling, GENERATED.

Nothing here lists a cell by hand. The factors come from rcomp's own tables:

* model kinds: :data:`MODEL_KINDS` (each kind is made by rcomp's own stages from its parent);
* commands that take a checkpoint: ``info`` plus every stage of :data:`rcomp.stages.STAGES` whose command
  line takes a checkpoint (``rcomp.cli.commands.INPUTS``), each with the variants its declarations give
  (``prune --method`` choices, ``quantize`` int8 and ``--simulate --bits``, ``finetune --adv`` choices,
  ``attack --attack`` = every attack and suite of :mod:`rcomp.attacks`, all single attacks as a
  ``--cascade``, ``--from``; ``bench`` with several attacks and ``--fail-under``);
* whether the examples / results are saved (``-o``) where the command can save them, and one eps or a
  sweep of two where it takes ``--eps``;
* ways of calling: flags, ``--config FILE``, a recipe stage (``rcomp run``), a pipe (path on stdin),
  ``--json`` and the Python API -- each where the command offers it.

The budgets (``-n``, ``--steps``, ``--epochs``, ``--queries`` ...) come from :data:`TINY`; each is given
to a cell only where the command declares the option and accepts it for that variant (probed through
the same ``make_config`` and attack builder the command uses), so a new attack or option gets the
budgets it takes without editing anything here. The full product is reduced to all-pairs coverage
(:func:`all_pairs`, deterministic, no dependency).

The adapters below (:func:`attack_table`, :func:`stage_config`, :func:`add_attack`) are the only places
that know where rcomp keeps those tables.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# adapters to rcomp's public tables (repoint here if they move)
# ---------------------------------------------------------------------------------------------


def attack_table() -> dict[str, Any]:
    """Every attack and suite ``--attack`` takes (the attack catalogue, plugins included): name -> entry."""
    from rcomp.attacks.catalog import ATTACKS

    return {e.name: e for e in ATTACKS.entries()}


def suite_names() -> list[str]:
    return [name for name, e in attack_table().items() if e.get("suite")]


def single_attack_names() -> list[str]:
    suites = set(suite_names())
    return [a for a in attack_table() if a not in suites]


def stage_names() -> tuple[str, ...]:
    from rcomp.stages import STAGES

    return tuple(STAGES)


def stage_config(command: str) -> type:
    if command == "info":
        from rcomp.cli.info import InfoOptions

        return InfoOptions
    from rcomp.stages import get_stage

    return get_stage(command).config


def declared(command: str) -> dict[str, Any]:
    """The command's declared options by field name (``rcomp.options.options_of``)."""
    from rcomp.options import options_of

    return {o.name: o for o in options_of(stage_config(command))}


def takes_checkpoint(command: str) -> bool:
    if command == "info":
        return True
    from rcomp.cli.commands import INPUTS

    return INPUTS.get(command) in ("one", "many", "optional")


def add_attack(monkeypatch, name: str, cls: type, takes: tuple[str, ...] = ()) -> None:
    """Register attack ``cls`` as ``name`` for the rest of a test, as a built-in catalogue entry taking
    ``takes``: every declared ``attack`` option's choices come from the catalogue, so they follow."""
    import sys
    import types

    from rcomp.attacks.catalog import ATTACKS
    from rcomp.catalog import Entry

    mod = types.ModuleType(f"rcomp_matrix_{name}")
    setattr(mod, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(ATTACKS.builtin, name, Entry(name, f"{mod.__name__}:{cls.__name__}", help="test attack",
                                                     takes=takes))


# ---------------------------------------------------------------------------------------------
# the factors
# ---------------------------------------------------------------------------------------------

#: model kinds rcomp produces: kind -> (parent kind, stage, options); "dense" is a trained convnet8 on digits
MODEL_KINDS: dict[str, tuple[str, str, dict] | None] = {
    "dense": None,
    "pruned": ("dense", "prune", {"ratio": 0.5}),
    "pruned2": ("pruned", "prune", {"ratio": 0.3}),
    "int8": ("dense", "quantize", {"calib_n": 64, "eval_n": 0}),
    "sim2": ("dense", "quantize", {"simulate": True, "bits": 2, "calib_n": 64, "eval_n": 0}),
    "sim4": ("dense", "quantize", {"simulate": True, "bits": 4, "calib_n": 64, "eval_n": 0}),
    "sim8": ("dense", "quantize", {"simulate": True, "bits": 8, "calib_n": 64, "eval_n": 0}),
    "pruned-int8": ("pruned", "quantize", {"calib_n": 64, "eval_n": 0}),
    "pruned-sim4": ("pruned", "quantize", {"simulate": True, "bits": 4, "calib_n": 64, "eval_n": 0}),
    "qat-int8": ("int8", "finetune", {"epochs": 1, "n": 64, "eval_n": 0, "batch_size": 32}),
    "qat-sim4": ("sim4", "finetune", {"epochs": 1, "n": 64, "eval_n": 0, "batch_size": 32}),
}

EPS = "0.1"
DATA = "digits"
#: tiny budgets, in the order they are tried; a cell gets each one its command declares and accepts
TINY: dict[str, Any] = {
    "data": DATA, "eps": EPS, "n": 8, "eval_n": 8, "calib_n": 8, "epochs": 1, "steps": 1, "queries": 4,
    "targets": 1, "batches": 1, "batch_size": 8, "score_steps": 1, "adv_steps": 1, "adv_eps": 0.1,
    "latency_batch": 0,
}
#: what a command needs besides its variant before any budget can be probed
BASE: dict[str, dict[str, Any]] = {"prune": {"ratio": 0.25}, "attack": {"data": DATA, "eps": EPS},
                                   "bench": {"data": DATA, "eps": EPS}}
#: placeholder for the --from file, made once per session from the dense model
EXAMPLES = "<examples>"

WAYS = ("flags", "config", "recipe", "pipe", "json", "api")


@dataclass(frozen=True)
class Action:
    """One command with one variant of its options (budgets included)."""

    name: str
    command: str
    options: Mapping[str, Any]
    #: can -o save something here (attack examples, bench results)? None: the command always writes
    saves: bool = False

    @property
    def attacks(self) -> tuple[str, ...]:
        a = self.options.get("attack") or ()
        return tuple(a) if isinstance(a, (list, tuple)) else tuple(str(a).split(","))


def _variants(command: str) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, options, saves) of each variant, read from the command's declarations and the attack table."""
    opts = declared(command)
    if command == "info":
        return [("info", {}, False)]
    if command == "prune":
        return [(f"prune:{m}", {"method": m}, False) for m in opts["method"].choices]
    if command == "quantize":
        bits = opts["bits"]
        sim_bits = sorted({int(bits.min), 4})
        return [("quantize:int8", {}, False),
                *[(f"quantize:sim{b}", {"simulate": True, "bits": b}, False) for b in sim_bits]]
    if command == "finetune":
        return [(f"finetune:{a}", {"adv": a}, False) for a in opts["adv"].choices]
    singles = single_attack_names()
    if command == "attack":
        out = [(f"attack:{a}", {"attack": (a,)}, True) for a in attack_table()]
        out.append(("attack:cascade", {"attack": tuple(singles), "cascade": True}, True))
        out.append(("attack:from", {"from_file": EXAMPLES}, False))
        return out
    if command == "bench":
        return [("bench:singles", {"attack": tuple(singles), "fail_under": "clean=0,worst=0"}, True),
                ("bench:cascade", {"attack": tuple(singles), "cascade": True, "fail_under": "worst=0"}, True),
                ("bench:suites", {"attack": (*suite_names(), singles[0]), "fail_under": "clean=0"}, True)]
    return [(command, {}, False)]


#: options given only where a variant is refused without them (the refusal names the flag)
REQUIRES = ("data", "eps", "adv_eps")


def refusal(command: str, options: Mapping[str, Any]) -> str | None:
    """Why the command's own config (and, for attacks, the attack builder) refuses these options, or None."""
    from rcomp.errors import RcompError
    from rcomp.options import make_config

    given = {k: (",".join(v) if isinstance(v, tuple) else v) for k, v in options.items()}
    if "from_file" in given:
        given["from_file"] = "examples.safetensors"
    try:
        cfg = make_config(stage_config(command), given, command=command)
        if getattr(cfg, "attack", None) and hasattr(cfg, "build"):
            cfg.build(0)
    except RcompError as exc:
        return str(exc)
    return None


def with_budgets(command: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` plus what the variant needs (:data:`REQUIRES`, where a refusal names it) and every tiny
    budget of :data:`TINY` the command declares and accepts with them."""
    names = declared(command)
    if "from_file" in options:  # a replay takes no attack budgets, only the points
        return {**options, **{k: TINY[k] for k in ("n",) if k in names}}
    out = {**BASE.get(command, {}), **options}
    why = refusal(command, out)
    while why is not None:
        need = [k for k in REQUIRES if k in names and k not in out and names[k].flag in why]
        if not need:
            break
        out[need[0]] = TINY[need[0]]
        why = refusal(command, out)
    for key, value in TINY.items():
        if key not in REQUIRES and key in names and key not in out and refusal(command, {**out, key: value}) is None:
            out[key] = value
    return out


def actions() -> list[Action]:
    """Every (command, variant) that takes a checkpoint, with its budgets."""
    cmds = ["info", *[s for s in stage_names() if takes_checkpoint(s)]]
    return [Action(name, cmd, with_budgets(cmd, opts), saves)
            for cmd in cmds for name, opts, saves in _variants(cmd)]


@functools.cache
def ways_for(command: str) -> tuple[str, ...]:
    """The ways of calling ``command``, from what it offers."""
    import rcomp

    stage = command in stage_names()
    offered = {"flags": True, "config": stage, "recipe": stage, "pipe": takes_checkpoint(command),
               "json": "json" in declared(command), "api": stage and hasattr(rcomp, command)}
    return tuple(w for w in WAYS if offered[w])


@dataclass(frozen=True)
class Cell:
    kind: str
    action: Action
    way: str
    #: "-o" or "" where the command may save (attack, bench); None where it always writes or never does
    save: str | None
    #: the --eps list of an attack or bench cell (one eps, or a sweep of two); None for other commands
    eps: str | None = None

    @property
    def id(self) -> str:
        return (f"{self.kind}-{self.action.name}-{self.way}" + (f"{self.save}" if self.save else "")
                + ("-sweep" if self.eps and "," in self.eps else ""))

    @property
    def several(self) -> bool:
        """Several attacks or several eps in one run."""
        return len(self.action.attacks) > 1 or bool(self.eps and "," in self.eps)


def all_pairs(factors: Mapping[str, list], valid: Callable[[dict], bool]) -> list[dict]:
    """A small set of valid combinations covering every pair of values (of two factors) that some valid
    combination contains. Greedy and deterministic: each pick is the first combination, in product order,
    that covers the most pairs not yet covered."""
    names = list(factors)
    combos = [c for c in (dict(zip(names, vals, strict=True)) for vals in itertools.product(*factors.values()))
              if valid(c)]
    index: dict[tuple, int] = {}

    def pairs(c: dict) -> frozenset[int]:
        return frozenset(index.setdefault((a, _key(c[a]), b, _key(c[b])), len(index))
                         for a, b in itertools.combinations(names, 2))

    cover = [sum(1 << p for p in pairs(c)) for c in combos]  # bit masks of the pairs each combination covers
    need = 0
    for m in cover:
        need |= m
    chosen = []
    while need:
        best = max(range(len(combos)), key=lambda i: ((cover[i] & need).bit_count(), -i))
        chosen.append(combos[best])
        need &= ~cover[best]
    return chosen


def _key(v: Any) -> Any:
    return v.name if isinstance(v, Action) else v


#: the eps factor of attack and bench cells: one eps, or a sweep of two
EPS_LISTS = (EPS, f"0.05,{EPS}")


def _valid(c: dict) -> bool:
    a: Action = c["action"]
    if c["way"] not in ways_for(a.command):
        return False
    if (c["eps"] is not None) != ("eps" in a.options):
        return False
    if not a.saves:
        return c["save"] is None
    if c["save"] is None:
        return False
    # a recipe stage always has an output: its attack / bench stages always save
    return not (c["way"] == "recipe" and c["save"] != "-o")


def matrix(kinds: Iterable[str] | None = None) -> list[Cell]:
    """The generated cells: all-pairs over kind x action x way x save."""
    factors = {"kind": list(kinds or MODEL_KINDS), "action": actions(), "way": list(WAYS),
               "save": [None, "", "-o"], "eps": [None, *EPS_LISTS]}
    return [Cell(c["kind"], c["action"], c["way"], c["save"], c["eps"]) for c in all_pairs(factors, _valid)]


def full_product_size(kinds: Iterable[str] | None = None) -> int:
    ks = list(kinds or MODEL_KINDS)
    return sum(1 for k, a, w, s, e in itertools.product(ks, actions(), WAYS, [None, "", "-o"], [None, *EPS_LISTS])
               if _valid({"kind": k, "action": a, "way": w, "save": s, "eps": e}))


# ---------------------------------------------------------------------------------------------
# running a cell
# ---------------------------------------------------------------------------------------------

def argv_options(command: str, options: Mapping[str, Any]) -> list[str]:
    """Command-line flags for ``options`` (field names), from the declarations."""
    decl = declared(command)
    args: list[str] = []
    for name, v in options.items():
        o = decl[name]
        if o.kind == "bool":
            if v:
                args.append(o.flag)
            elif o.secondary:
                args.append(o.secondary)
            continue
        args += [o.flag, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return args


def file_options(command: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` keyed as users write them in a ``--config`` file or a recipe (``data-dir``, ``from``)."""
    decl = declared(command)
    return {decl[k].key: (",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in options.items()}


def finite_figures(obj: Any, where: str = "report") -> None:
    """Every number in a JSON-able report is finite."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), f"{where} = {obj}"
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            finite_figures(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            finite_figures(v, f"{where}[{i}]")


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folders``: path -> (size, mtime_ns)."""
    out = {}
    for f in folders:
        for p in sorted(Path(f).rglob("*")):
            if p.is_file() or p.is_symlink():
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out
