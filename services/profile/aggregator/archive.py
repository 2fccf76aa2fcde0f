"""The archiver as a thread of the aggregator process: every `PROFILE_ARCHIVE_INTERVAL_S` it archives the
partitions this process folds (their folded events older than the hot window go to the offline store and
leave the log; `services/common/storage/archiver.py` holds the rules). The partitions come from the
aggregator's leases, so the processes share the archiving as they share the folding; each partition's archive
run takes its own lease too, so `selaras archive` run by hand never overlaps it.

The same thread compacts the offline feature history (`compact`: services/profile/compaction.py), in the
process that holds partition 0, so one process does it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from prometheus_client import Counter, Gauge

from services.common.clock import wall_time
from services.common.errors import StorageUnavailable
from services.common.storage import Store
from services.common.storage.archiver import ArchiveReport, archive_log
from services.features.compaction import CompactionReport

log = logging.getLogger(__name__)

ARCHIVED = Counter("selaras_archived_events_total", "Folded log entries written to the event archive")
TRIMMED = Counter("selaras_trimmed_events_total", "Log entries trimmed from the store once archived")
COMPACTED = Counter("selaras_offline_files_compacted_total", "Offline part files merged into larger ones", ["view"])
UNCOMPACTED = Gauge(
    "selaras_offline_uncompacted_files",
    "Offline part files of a feature view that no compaction merged yet (after the last run)",
    ["view"],
)
LAST_ARCHIVE = Gauge("selaras_archive_last_run_timestamp_seconds", "When the archiver last finished a run")


class PeriodicArchiver:
    def __init__(
        self,
        store: Store,
        window_s: float,
        interval_s: float,
        holder: str,
        partitions: Callable[[], Sequence[int]],
        compact: Callable[[], Sequence[CompactionReport]] | None = None,
    ):
        self.store = store
        self.window_s = window_s
        self.interval_s = interval_s
        self.holder = holder
        self.partitions = partitions
        self.compact = compact
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_report: ArchiveReport | None = None

    def run_once(self) -> ArchiveReport | None:
        report = None
        if self.store.archive is not None:
            report = archive_log(
                self.store, self.store.archive, self.store.log_time(), self.window_s, self.holder, self.partitions()
            )
            ARCHIVED.inc(report.archived)
            TRIMMED.inc(report.trimmed)
            LAST_ARCHIVE.set(wall_time())
            self.last_report = report
        if self.compact is not None and 0 in self.partitions():
            for compacted in self.compact():
                COMPACTED.labels(compacted.view).inc(compacted.files_merged)
                UNCOMPACTED.labels(compacted.view).set(compacted.uncompacted_after)
        return report

    def start(self) -> None:
        if self.interval_s <= 0 or (self.store.archive is None and self.compact is None):
            return
        self._thread = threading.Thread(target=self._loop, name="archiver", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        # The first run waits one interval too: a process that restarts often does not re-read the log each time.
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except StorageUnavailable as exc:  # Redis is down: the next run retries
                log.warning("archive run failed, retrying next interval: %s", type(exc).__name__)
            except Exception:  # the offline volume, a file: keep the thread; nothing was trimmed unarchived
                log.exception("archive run failed, retrying next interval")
