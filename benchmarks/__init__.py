"""Benchmarks: `make bench` writes docs/benchmarks.md; `benchmarks/gpu_kit.py` runs on a GPU box."""
