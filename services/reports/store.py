"""Where rendered reports are kept: the shared store (Redis or the embedded SQLite), so a report written by a
command on one machine (a Kubernetes job, a laptop) is served by every recommend replica.

One record per report name, replaced by the next run of the same command; a handful of names in all (one per
command and protocol), each a few tens of kilobytes.
"""

from __future__ import annotations

import orjson

from services.common.storage import Namespace, Store
from services.reports.pages import Report


class ReportStore:
    def __init__(self, store: Store):
        self.store = store

    def save(self, report: Report) -> None:
        """Store `report` under its name (replacing an earlier one); durable when it returns."""
        self.store.put(Namespace.REPORTS, report.name, orjson.dumps(report.to_dict()))

    def get(self, name: str) -> Report | None:
        raw = self.store.get(Namespace.REPORTS, name)
        return None if raw is None else Report(**orjson.loads(raw))

    def all(self) -> list[Report]:
        """Every stored report, newest first."""
        reports = [Report(**orjson.loads(raw)) for _, raw in self.store.scan(Namespace.REPORTS)]
        return sorted(reports, key=lambda r: r.created_at, reverse=True)
