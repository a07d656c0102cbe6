"""Recipes: YAML files of CLI stages with named inputs and outputs (``rcomp run``, ``rcomp demo``)."""
