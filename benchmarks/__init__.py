"""Benchmarks (run with ``pytest benchmarks/ --benchmark-only``); never imported by the package."""
