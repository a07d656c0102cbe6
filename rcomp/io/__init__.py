"""Checkpoint and file I/O: the safetensors checkpoint format v1 and atomic writes."""
