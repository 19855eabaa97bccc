"""Helpers for tests and benchmarks (naive reference implementations); not library code."""
