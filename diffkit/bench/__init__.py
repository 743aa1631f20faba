"""Benchmarks: each stage's speed and memory against a baseline measured in the same run.

``diffkit bench collect`` -> :mod:`diffkit.bench.collect` (measurements) and
:mod:`diffkit.bench.collect_report` (the markdown under ``reports/benchmarks/``).
"""
