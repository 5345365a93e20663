"""Benchmarks: python -m bench.layer (one LoRA layer), python -m bench.train (a training step)."""
