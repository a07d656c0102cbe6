"""Datasets by name (``--data``), adapted to a model's input spec, always in [0, 1]."""
