"""Benchmarks and campaigns: run from the repository's root, e.g. ``python -m tools.bench``."""
