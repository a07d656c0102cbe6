"""Evaluation: clean and robust accuracy, cost (parameters, MACs, latency, size), benchmarks."""
