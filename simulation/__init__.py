"""Simulation: the embedded demo cohort, partitioners and the single-machine runner."""
