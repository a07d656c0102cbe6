"""The attacks, listed once: name, class, the options each takes, help and paper (no torch).

``takes`` names the options of :class:`rcomp.stages.attack.AttackOptions` an attack accepts
(``eps`` and ``norm`` every attack takes). ``extra["fixed"]``: options it does not take but whose
one value it accepts (fgsm takes ``steps=1``), ``extra["refusal"]``: the message refusing an
option it does not take (``{value}`` is the value given); ``extra["suite"]``: an attack made of
stages, run as a cascade. Installed packages add attacks through the ``rcomp.attacks`` entry-point
group (see :mod:`rcomp.catalog`); their ``ref`` names a class or factory called as
``factory(eps, norm, seed=..., **options it takes)`` that returns an
:class:`rcomp.attacks.base.Attack`.
"""

from __future__ import annotations

from rcomp.catalog import Catalogue, Entry

#: threat models and losses every attack shares
NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr", "cw")

#: the options an attack may take beyond eps and norm, in the order the factories receive them
OPTIONS = ("steps", "alpha", "random_start", "restarts", "loss", "targeted", "queries", "p_init", "targets")

#: the attacks finetune's final evaluation offers: PGD-10 (cheap) or the auto suite (the figure to trust)
EVAL_CHOICES = ("pgd", "auto")

_NO_ALPHA = "{name} takes no step size; drop --alpha"
_ITERATIVE = ("steps", "alpha", "random_start", "restarts", "loss", "targeted")

ATTACKS = Catalogue("attack", [
    Entry("fgsm", "rcomp.attacks.fgsm:FGSM", "one signed-gradient step; no steps",
          "Goodfellow et al. 2015", takes=("alpha", "random_start", "loss", "targeted"),
          extra={"fixed": {"steps": 1, "restarts": 1},
                 "refusal": {"steps": "fgsm takes a single step; drop --steps or use pgd",
                             "restarts": "fgsm has no restarts; drop --restarts or use pgd"}}),
    Entry("pgd", "rcomp.attacks.pgd:PGD",
          "projected gradient descent; steps 10, alpha 2.5*eps/steps, random start",
          "Madry et al. 2018", takes=_ITERATIVE),
    Entry("apgd", "rcomp.attacks.apgd:APGD", "step-size-free APGD, --loss ce or dlr; steps 100",
          "Croce and Hein 2020", takes=("steps", "random_start", "restarts", "loss", "targeted"),
          extra={"refusal": {"alpha": "apgd adapts its own step size; drop --alpha"}}),
    Entry("apgd-t", "rcomp.attacks.apgd_t:APGDT",
          "APGD on the targeted DLR loss against the 9 nearest classes in turn; steps 100",
          "Croce and Hein 2020", takes=("steps", "random_start", "restarts", "loss", "targeted", "targets"),
          extra={"refusal": {"alpha": "apgd-t adapts its own step size; drop --alpha"}}),
    Entry("cw", "rcomp.attacks.cw:CW", "PGD on the Carlini-Wagner margin loss; steps 30, alpha 2.5*eps/steps",
          "Carlini and Wagner 2017 (loss), Madry et al. 2018 (PGD)",
          takes=("steps", "alpha", "random_start", "restarts", "targeted"),
          extra={"fixed": {"loss": "cw"},
                 "refusal": {"loss": "cw always uses the Carlini-Wagner margin loss, not {value!r}; "
                                     "use pgd --loss {value}"}}),
    Entry("square", "rcomp.attacks.square:Square",
          "score-based black box, forward passes only; 5000 queries", "Andriushchenko et al. 2020",
          takes=("loss", "targeted", "queries", "p_init"),
          extra={"fixed": {"restarts": 1, "random_start": True},
                 "refusal": {"steps": "square counts queries, not steps; drop --steps and set the query budget "
                                      "(queries=)",
                             "alpha": _NO_ALPHA,
                             "restarts": "square has no restarts; raise its query budget instead",
                             "random_start": "square always starts from its own initialisation; drop "
                                             "--no-random-start"}}),
    Entry("auto", "rcomp.attacks.auto:AutoAttack",
          "AutoAttack's standard suite as a cascade: apgd-ce, apgd-t (4 nearest classes), square with 1000 "
          "queries; 3 restarts on surrogate gradients", "Croce and Hein 2020",
          takes=("steps", "restarts", "queries", "targets"),
          extra={"suite": True, "fixed": {"random_start": True},
                 "refusal": {"alpha": _NO_ALPHA,
                             "random_start": "auto always starts from its own initialisation; drop --no-random-start",
                             "loss": "auto picks its own losses and targets; drop --loss and --targeted",
                             "targeted": "auto picks its own losses and targets; drop --loss and --targeted"}}),
], group="rcomp.attacks", flag="--attack", listing="rcomp info --attacks")
