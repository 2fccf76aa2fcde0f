"""The archiver: moves folded log entries older than the hot window from the store to the event archive.

Per partition, under its own lease (`archive-<log>`: one archiver per partition at a time, whichever process
runs it): read the partition from its oldest entry, take the prefix that is both folded (at or before the
aggregator's cursor) and older than the hot window (acknowledged before `now - window`), write what is not
archived yet (one file per day, fsynced and renamed), then trim the stream up to it. Never trims what is not
folded (the cursor bounds it) nor what is not archived (the write comes first). A crash between write and trim
leaves entries both archived and in the stream: the next run sees them covered by the newest file's name and
only trims them (readers skip them meanwhile: `Store.iter_partition`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson

from services.common.events import envelope_visitor, open_envelope
from services.common.storage.archive import ArchiveRow, EventArchive
from services.common.storage.base import LogEntry, Namespace, Store, partition_log, position_order

log = logging.getLogger(__name__)

ARCHIVE_CHUNK = 50_000  # entries read, written and trimmed per step (a mid-size shop's day of one partition)
DAY_S = 86_400
ARCHIVE_LEASE_S = 120.0
# An erasure stamps its end with its host's clock, rows carry Redis's: a minute of skew between them is absorbed.
CLOCK_MARGIN_S = 60.0

# (partition, entries archived so far, entries trimmed so far): the CLI's progress bar.
ArchiveProgress = Callable[[int, int, int], None]


@dataclass
class PartitionArchive:
    partition: int
    archived: int = 0  # rows written to the archive
    trimmed: int = 0  # entries removed from the store
    files: int = 0
    skipped: str | None = None  # why nothing was done ("held by ...", "not folded yet")


@dataclass
class ArchiveReport:
    cutoff: float
    partitions: list[PartitionArchive] = field(default_factory=list)

    @property
    def archived(self) -> int:
        return sum(p.archived for p in self.partitions)

    @property
    def trimmed(self) -> int:
        return sum(p.trimmed for p in self.partitions)


def appended_at(entry: LogEntry) -> float:
    """When the log acknowledged the entry: a Redis stream id starts with it (ms); the embedded store's
    positions are row numbers, so its envelope's receive time."""
    if "-" in entry.position:
        return int(entry.position.partition("-")[0]) / 1000.0
    try:
        return float(orjson.loads(entry.payload)["at"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0.0  # an unreadable (dead-letter) entry: as old as can be, archived with its neighbours


def _row(entry: LogEntry) -> ArchiveRow:
    at = appended_at(entry)
    try:
        event = open_envelope(entry.payload)[1]
    except Exception:  # a dead letter (set aside by the aggregator) is archived as it was logged
        try:
            visitor_id = envelope_visitor(entry.payload) or ""
        except orjson.JSONDecodeError:
            visitor_id = ""
        return ArchiveRow(entry.position, visitor_id, "", at, at, entry.payload)
    return ArchiveRow(entry.position, event.visitor_id, event.event_id, event.ts, at, entry.payload)


def erased_positions(store: Store, rows: Sequence[ArchiveRow]) -> set[str]:
    """Rows of visitors erased since they were logged (an erasure marks the visitor before it deletes anything,
    `until` None while it runs): they must not reach the archive."""
    visitors = sorted({row.visitor_id for row in rows})
    marks = dict(zip(visitors, store.get_many(Namespace.ERASED, visitors), strict=True))
    dropped: set[str] = set()
    for row in rows:
        raw = marks.get(row.visitor_id)
        if raw is None:
            continue
        until = orjson.loads(raw).get("until")
        if until is None or row.appended_at <= until + CLOCK_MARGIN_S:
            dropped.add(row.position)
    return dropped


def archive_partition(
    store: Store,
    archive: EventArchive,
    partition: int,
    cutoff: float,
    holder: str,
    progress: ArchiveProgress | None = None,
    chunk: int = ARCHIVE_CHUNK,
) -> PartitionArchive:
    """Archive and trim one partition's folded entries acknowledged before `cutoff` (the store's log clock)."""
    done = PartitionArchive(partition)
    name = f"archive-{partition_log(partition)}"
    if not store.acquire_lease(name, holder, ARCHIVE_LEASE_S):
        done.skipped = f"archived by {store.lease_holder(name)}"
        return done
    try:
        raw_cursor = store.get(Namespace.CURSOR, partition_log(partition))
        if raw_cursor is None:
            done.skipped = "nothing folded yet"
            return done
        cursor = position_order(raw_cursor.decode())
        archived = archive.archived_until(partition)
        after: str | None = None
        while entries := store.read_events(after, chunk, partition):
            ready: list[LogEntry] = []
            for entry in entries:
                if position_order(entry.position) > cursor or appended_at(entry) >= cutoff:
                    break
                ready.append(entry)
            if not ready:
                break
            fresh = [e for e in ready if archived is None or position_order(e.position) > position_order(archived)]
            if fresh:
                rows = [_row(entry) for entry in fresh]
                written = archive.write(partition, rows, lambda rows: erased_positions(store, rows))
                done.files += len(written)
                done.archived += len(rows)
                archived = fresh[-1].position
            # Only after the files are durable: the stream loses what the archive holds.
            done.trimmed += store.trim_log(partition, ready[-1].position)
            if progress is not None:
                progress(partition, done.archived, done.trimmed)
            if not store.acquire_lease(name, holder, ARCHIVE_LEASE_S):
                done.skipped = "lost the archive lease"
                break
            if len(ready) < len(entries):
                break
            after = ready[-1].position
    finally:
        store.release_lease(name, holder)
    if done.archived or done.trimmed:
        log.info("archived %d and trimmed %d log entries of partition %d", done.archived, done.trimmed, partition)
    return done


def archive_log(
    store: Store,
    archive: EventArchive,
    now: float,
    window_s: float,
    holder: str,
    partitions: Sequence[int] | None = None,
    progress: ArchiveProgress | None = None,
) -> ArchiveReport:
    """Archive every partition (or the given ones): entries folded and acknowledged before `now - window_s`.
    A window of a day or more is cut at the UTC day boundary before that moment, so a day is archived in one
    run (one file per day and partition, instead of one per run: erasure reads every file's footer) and the
    store holds between the window and a day more."""
    cutoff = now - window_s
    if window_s >= DAY_S:
        cutoff = cutoff // DAY_S * DAY_S
    report = ArchiveReport(cutoff)
    for partition in range(store.partitions) if partitions is None else partitions:
        report.partitions.append(archive_partition(store, archive, partition, report.cutoff, holder, progress))
    return report
