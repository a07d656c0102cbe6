"""A recipe input chosen at run time: the best of several stages' models by another stage's bench.

In a recipe, an input may be ``{best: [A, B, ...], by: BENCH}``: of the models the stages (or globs, or
``save-at`` files) ``A, B, ...`` wrote, the one whose per-example worst-case robust accuracy in the output
of bench stage ``BENCH`` (``format: json``) is highest; a tie goes to the first listed. E.g. the demo
judges with ``auto`` only the better of each path's two fine-tuning methods by PGD-10::

    inputs: [baseline, {best: [pruned-ft-pgd-s67, pruned-ft-nfgsm-s270], by: bench}]

The stage then runs after ``BENCH`` and every candidate; which model it took is said on stderr and is
part of its fingerprint (a rerun that chooses another model runs the stage again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcomp.errors import RcompError
from rcomp.text import printable

KEYS = {"best", "by"}
#: a bench JSON of a recipe stage is a few MB at most
BENCH_MAX_BYTES = 256 * 1024 * 1024


@dataclass
class Choice:
    """``best`` (stage names or globs, as written), ``by`` (a bench stage); after linking, ``names`` and
    ``paths`` of the candidates and the ``by`` stage's output."""
    best: list[str]
    by: str
    names: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    by_output: str = ""

    @classmethod
    def parse(cls, raw: Any, where: str) -> Choice:
        """From a recipe's ``{best: [...], by: NAME}``, refusing anything else in one line."""
        if set(map(str, raw)) != KEYS:
            extra = sorted(map(str, set(map(str, raw)) - KEYS))
            what = f"unknown key {extra[0]!r}" if extra else "it needs both best: and by:"
            raise RcompError(f"{where}: an input chosen at run time is {{best: [STAGE, ...], by: BENCH-STAGE}}; {what}")
        best, by = raw["best"], raw["by"]
        best = [best] if isinstance(best, str) else best
        if not isinstance(best, list) or not best or not all(isinstance(b, str) and b for b in best):
            raise RcompError(f"{where}: best: is a list of stage names (or globs) to choose from")
        if not isinstance(by, str) or not by:
            raise RcompError(f"{where}: by: names the bench stage whose worst case chooses the model")
        return cls(best=list(best), by=by)

    def label(self) -> str:
        """How the input shows before it is chosen (dry runs, logs)."""
        return f"best-of({'|'.join(self.names or self.best)};by={self.by})"

    def refs(self) -> list[str]:
        """The names it reads: candidates and the bench stage."""
        return [*self.best, self.by]


def pick(choice: Choice, where: str, log) -> tuple[str, dict[str, Any]]:
    """The path of the candidate with the highest worst case in the ``by`` stage's bench JSON (first
    listed on a tie), and what the run records of the choice (``by``, ``chosen``, ``figures``: name -> worst
    case); says which on ``log``. A bench output without a candidate's row, or with a row for another
    version of its file, is refused: the bench stage must run again."""
    from rcomp.io.bounded import read_bounded
    from rcomp.io.header import sha256_file

    out = Path(choice.by_output)
    try:
        data = json.loads(read_bounded(out, BENCH_MAX_BYTES, what=f"stage {choice.by}'s output"))
        rows = {Path(m["path"]).resolve(): m for m in data["models"] if isinstance(m, dict) and m.get("path")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RcompError(f"{where}: stage {choice.by}'s output {printable(out.name, 80)} is not a bench JSON "
                         f"({type(exc).__name__}); delete it and rerun the recipe") from None
    scores: list[tuple[str, str, float]] = []
    for name, path in zip(choice.names, choice.paths, strict=True):
        row = rows.get(Path(path).resolve())
        score = row.get("worst_case_acc") if row else None
        if row is None or not isinstance(score, (int, float)) or isinstance(score, bool):
            raise RcompError(f"{where}: stage {choice.by}'s output has no figure for {name!r}; "
                             f"delete {printable(out.name, 80)} and rerun the recipe")
        if row.get("sha256") and row["sha256"] != sha256_file(path):
            raise RcompError(f"{where}: stage {choice.by}'s figure for {name!r} is of an older version of "
                             f"its file; delete {printable(out.name, 80)} and rerun the recipe")
        scores.append((name, path, float(score)))
    best = max(scores, key=lambda s: s[2])  # max keeps the first of equal scores
    attacks = ",".join(data.get("attacks") or {}) or "clean accuracy"
    log(f"best of {', '.join(f'{n} {s:.4f}' for n, _, s in scores)} by stage {choice.by}'s worst case "
        f"({attacks}): {best[0]}")
    return best[1], {"by": choice.by, "chosen": best[0], "figures": {n: sc for n, _, sc in scores}}
