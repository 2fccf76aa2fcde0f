"""Experiment statistics from per-arm sufficient statistics (pure numpy/scipy, no I/O), one module per method
of docs/statistics.md."""
