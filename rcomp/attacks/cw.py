"""CW: PGD on the Carlini-Wagner margin loss.

Loss from Carlini and Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P
2017 (``max_{j != y} z_j - z_y`` on the logits ``z``), maximised with the PGD of Madry et al. 2018
inside the eps ball, as in Madry et al.'s "CW" evaluations. The margin loss does not saturate the
way cross-entropy does, so it catches models whose cross-entropy gradients are masked.
"""

from __future__ import annotations

from rcomp.attacks.pgd import PGD
from rcomp.errors import RcompError


class CW(PGD):
    """PGD with the margin loss. Defaults: ``steps=30``, ``alpha = 2.5 * eps / steps``, random
    start on, ``restarts=1`` (all other options as :class:`~rcomp.attacks.pgd.PGD`)."""

    name = "cw"
    paper = "Carlini and Wagner 2017 (loss), Madry et al. 2018 (PGD)"
    default_steps = 30
    default_loss = "cw"

    def __init__(self, eps: float, norm: str = "linf", *, loss: str | None = None, **kw):
        if loss not in (None, "cw"):
            raise RcompError(f"cw always uses the Carlini-Wagner margin loss, not {loss!r}; use pgd --loss {loss}")
        super().__init__(eps, norm, loss="cw", **kw)
