"""Benchmarks shipped with the library: `memext bench ...`."""
