"""The aggregator process: folds the partitioned event log into features exactly once in effect (worker.py),
with its lease, commit record, observers, probe server, and the in-process bulk fold of whole histories."""
