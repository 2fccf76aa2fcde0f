"""Selaras: personalization for online shops.

Importing Feast's metrics module sets PROMETHEUS_MULTIPROC_DIR to a temp dir of its own, which silently
switches prometheus_client (in this process and every child) into multiprocess mode. We decide instead:
multiprocess mode only when SELARAS_METRICS_DIR is set (several uvicorn workers), in-process otherwise.
prometheus_client picks its value class at import, so it is imported here, first.
"""

import os

_metrics_dir = os.environ.get("SELARAS_METRICS_DIR")
if _metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    os.environ["PROMETHEUS_MULTIPROCESS_DIR"] = _metrics_dir
else:
    for _name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", "PROMETHEUS_MULTIPROCESS_DIR"):
        os.environ.pop(_name, None)

import prometheus_client  # noqa: E402,F401

if not _metrics_dir:
    # Feast creates its temp dir only when this is unset; an empty value makes it reuse "nothing".
    os.environ["PROMETHEUS_MULTIPROCESS_DIR"] = ""
