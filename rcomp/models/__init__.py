"""Models: the registry that turns names into networks (:mod:`.registry`), the built-in
architectures (:mod:`.builtin`), :class:`~rcomp.models.wrapper.Classifier` (normalisation inside the
model), and turning checkpoint files into modules and back (:mod:`.loading`, with the pruned
structure in :mod:`.structure` and the checks a file must pass in :mod:`.checks`)."""
