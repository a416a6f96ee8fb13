"""Benchmarks run from the repo root (a package, so Opacus's own top-level `benchmarks` cannot shadow it)."""
