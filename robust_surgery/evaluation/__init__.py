"""Robustness evaluation: attacks, the ε-sweep run, its resumable state, the sanity checks and plots."""
