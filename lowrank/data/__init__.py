"""Offline data and model helpers used by the experiments, benchmarks and slow tests."""
