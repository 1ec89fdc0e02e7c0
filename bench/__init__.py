"""Benchmarks for lora-registry (run as modules from the repository root: `python -m bench.X`)."""
