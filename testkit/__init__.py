"""Helpers the tests and the benchmarks share (tiny random models built offline)."""
