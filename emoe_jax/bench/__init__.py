"""Benchmarks: python -m emoe_jax.bench {runtime,...}. Speed targets live here, never in unit tests."""
