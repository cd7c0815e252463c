"""Benchmarks of ctok hot paths; run `python -m benchmarks` (see __main__.py)."""
