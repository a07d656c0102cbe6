"""Models: the registry that turns names into networks, the built-in architectures, and
:class:`~rcomp.models.wrapper.Classifier`, which puts normalisation inside the model."""
