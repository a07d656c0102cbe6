"""The channel importances of structured pruning, listed once: name, factory, options, help, paper.

An importance's ``ref`` names a factory returning a torch-pruning importance (``factory()``).
``extra["needs_data"]``: it scores channels from gradients on data batches (``--data``);
``extra["prepare"]``: ``"module:function"`` called before every pruning step as
``prepare(net, importance, normalize=, batches=, adv=, keep=, ignored=, seed=)`` (gradients for
taylor, learned scores for hydra); ``extra["adversarial"]``: ``"optional"`` or ``"required"`` when
it can score on adversarial examples (``--adv-eps``). Installed packages add importances through
the ``rcomp.importances`` entry-point group (see :mod:`rcomp.catalog`). No torch here.
"""

from __future__ import annotations

from rcomp.catalog import Catalogue, Entry

#: how the ratio applies: to every layer alike, or to all channels ranked together
SCOPES = ("local", "global")

IMPORTANCES = Catalogue("importance", [
    Entry("l1", "rcomp.pruning.pruner:magnitude_l1", "filter L1 norm, the study's criterion",
          "Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017"),
    Entry("l2", "rcomp.pruning.pruner:magnitude_l2", "filter L2 norm", "Li et al. 2017"),
    Entry("random", "rcomp.pruning.pruner:random_scores", "uniform random scores (a seeded baseline)", ""),
    Entry("bn-scale", "rcomp.pruning.pruner:bn_scale", "|gamma| of the following BatchNorm",
          "Liu et al., Network Slimming, ICCV 2017", extra={"needs_batchnorm": True}),
    Entry("taylor", "rcomp.pruning.pruner:taylor", "first-order Taylor |w * dL/dw| from data batches (needs "
          "--data; on PGD examples with --adv-eps)", "Molchanov et al., CVPR 2019",
          takes=("data", "batches", "adv_eps", "adv_steps"),
          extra={"needs_data": True, "adversarial": "optional", "prepare": "rcomp.pruning.pruner:taylor_prepare"}),
    Entry("hydra", "rcomp.pruning.robust:learned_importance", "channel scores learned against the adversarial "
          "loss (needs --data and --adv-eps)", "Sehwag et al., HYDRA, NeurIPS 2020",
          takes=("data", "batches", "adv_eps", "adv_steps", "score_steps"),
          extra={"needs_data": True, "adversarial": "required", "prepare": "rcomp.pruning.robust:hydra_prepare"}),
], group="rcomp.importances", flag="--method", listing="rcomp info --importances")


def needs_data(name: str) -> bool:
    return bool(IMPORTANCES.get(name).get("needs_data"))


def data_methods() -> tuple[str, ...]:
    """The built-in importances that need data (for messages)."""
    return tuple(e.name for e in IMPORTANCES.entries(plugins=False) if e.get("needs_data"))
