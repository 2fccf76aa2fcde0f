"""The event archive: folded log entries older than the hot window, as parquet files under the offline store.

Redis keeps only a hot window of the log (`SELARAS_HOT_WINDOW_DAYS`); everything older is archived here by
`archive_partition` and trimmed from the stream (docs/data-path.md, "Hot window and archive"). Layout, readable
by DuckDB (`read_parquet('<offline>/events/*/*/*.parquet', hive_partitioning = true)`):

    <offline_dir>/events/day=YYYY-MM-DD/partition=P/part-<first position>_<last position>.parquet

`day` is the UTC day the log acknowledged the entries (stream ids start with that time in ms), `partition` the
log partition. A file holds one day of one partition from one archive run; its name says which log positions it
covers, which is what makes the archive idempotent: entries up to the newest file's last position are archived,
so a run that stopped between writing a file and trimming the stream trims them next time without writing them
again. Rows are sorted by visitor id (then position) in row groups of `ROW_GROUP` rows, so one visitor's rows
are found through the row-group statistics without reading the rest of the file (erasure, export).

Files are written to a temporary name, fsynced and renamed (readers see a whole file or none), and rewritten
(erasure, retention) under a per-partition file lock that the archiver also takes while it writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.common.storage.base import LogEntry, position_order

ARCHIVE_DIR = "events"
ROW_GROUP = 2000
SCHEMA = pa.schema(
    [
        ("position", pa.string()),
        ("visitor_id", pa.string()),
        ("event_id", pa.string()),
        ("ts", pa.float64()),  # the event's own time (retention goes by it)
        ("appended_at", pa.float64()),  # when the log acknowledged it (the hot window goes by it)
        ("payload", pa.binary()),  # the log envelope, as stored in the stream
    ]
)
_NAME = re.compile(r"^part-(?P<first>[0-9-]+)_(?P<last>[0-9-]+)\.parquet$")


@dataclass(frozen=True)
class ArchiveRow:
    position: str
    visitor_id: str
    event_id: str
    ts: float
    appended_at: float
    payload: bytes


@dataclass(frozen=True)
class ArchiveFile:
    path: Path
    partition: int
    first: str
    last: str

    @property
    def order(self) -> tuple[int, int]:
        return position_order(self.first)


def day_of(appended_at: float) -> str:
    return datetime.fromtimestamp(appended_at, tz=UTC).strftime("%Y-%m-%d")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Write, fsync, rename, fsync the directory: after a crash the file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP, write_statistics=True)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _sorted_for_lookup(table: pa.Table) -> pa.Table:
    # By visitor: a visitor's rows sit in one or two row groups whose min/max statistics name it.
    return table.sort_by([("visitor_id", "ascending"), ("appended_at", "ascending"), ("position", "ascending")])


class EventArchive:
    """The archived part of the log (see the module docstring). Never holds a whole file set in memory: readers
    stream one file at a time."""

    def __init__(self, offline_dir: Path):
        self.root = offline_dir.resolve() / ARCHIVE_DIR

    # -- where things are -------------------------------------------------------------------------
    def files(self, partition: int | None = None) -> list[ArchiveFile]:
        """Archive files (of one partition, or all), oldest first (by their first log position)."""
        pattern = f"day=*/partition={'*' if partition is None else partition}/part-*.parquet"
        found: list[ArchiveFile] = []
        for path in self.root.glob(pattern):
            match = _NAME.match(path.name)
            if match is None:
                continue
            number = int(path.parent.name.removeprefix("partition="))
            found.append(ArchiveFile(path, number, match["first"], match["last"]))
        return sorted(found, key=lambda f: (f.partition, f.order))

    def archived_until(self, partition: int) -> str | None:
        """The last log position of the partition that is archived (None: nothing is)."""
        files = self.files(partition)
        return max((f.last for f in files), key=position_order) if files else None

    @contextlib.contextmanager
    def lock(self, partition: int) -> Iterator[None]:
        """Excludes the writers of one partition's files (archiver, erasure, retention), across processes that
        share the offline volume."""
        path = self.root / f".partition-{partition}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- writing ----------------------------------------------------------------------------------
    def write(
        self, partition: int, rows: Sequence[ArchiveRow], exclude: Callable[[Sequence[ArchiveRow]], set[str]]
    ) -> list[ArchiveFile]:
        """Archive `rows` (consecutive entries of one partition, in log order), one file per day. `exclude`
        returns the positions of rows that must not be archived (their visitor was erased meanwhile); it is
        asked under the partition's lock, so an erasure that starts later finds the files and purges them."""
        if not rows:
            return []
        written: list[ArchiveFile] = []
        with self.lock(partition):
            dropped = exclude(rows)
            by_day: dict[str, list[ArchiveRow]] = {}
            for row in rows:
                by_day.setdefault(day_of(row.appended_at), []).append(row)
            for day, group in sorted(by_day.items()):
                # The file is named after every position it covers, rows of erased visitors included, so the
                # range is known archived either way.
                name = f"part-{group[0].position}_{group[-1].position}.parquet"
                path = self.root / f"day={day}" / f"partition={partition}" / name
                kept = [r for r in group if r.position not in dropped]
                table = pa.table(
                    {
                        "position": [r.position for r in kept],
                        "visitor_id": [r.visitor_id for r in kept],
                        "event_id": [r.event_id for r in kept],
                        "ts": [r.ts for r in kept],
                        "appended_at": [r.appended_at for r in kept],
                        "payload": [r.payload for r in kept],
                    },
                    schema=SCHEMA,
                )
                _write_atomically(_sorted_for_lookup(table), path)
                written.append(ArchiveFile(path, partition, group[0].position, group[-1].position))
        return written

    # -- reading ----------------------------------------------------------------------------------
    def entries(self, partition: int) -> Iterator[LogEntry]:
        """The partition's archived entries in log order, one file in memory at a time."""
        for file in self.files(partition):
            yield from self._in_log_order(pq.read_table(file.path, columns=["position", "payload"]), partition)

    def visitor_entries(self, partition: int, visitor_id: str) -> Iterator[LogEntry]:
        """One visitor's archived entries in log order: files of its partition only, and in each file only the
        row groups whose visitor-id statistics can hold it."""
        for file in self.files(partition):
            table = pq.read_table(file.path, columns=["position", "payload"], filters=[("visitor_id", "=", visitor_id)])
            yield from self._in_log_order(table, partition)

    @staticmethod
    def _in_log_order(table: pa.Table, partition: int) -> Iterator[LogEntry]:
        rows = sorted(
            zip(table["position"].to_pylist(), table["payload"].to_pylist(), strict=True),
            key=lambda row: position_order(row[0]),
        )
        for position, payload in rows:
            yield LogEntry(position, payload, partition)

    def count(self, partition: int | None = None) -> int:
        """Archived entries (from the file footers)."""
        return sum(pq.ParquetFile(f.path).metadata.num_rows for f in self.files(partition))

    # -- deleting ---------------------------------------------------------------------------------
    def delete_visitor(self, partition: int, visitor_id: str) -> tuple[int, int]:
        """Erasure: remove the visitor's rows, rewriting only the files that hold some. Returns (rows, files)."""
        removed = rewritten = 0
        with self.lock(partition):
            for file in self.files(partition):
                probe = pq.read_table(file.path, columns=["visitor_id"], filters=[("visitor_id", "=", visitor_id)])
                if probe.num_rows == 0:
                    continue
                table = pq.read_table(file.path)
                kept = table.filter(pc.not_equal(table["visitor_id"], visitor_id))
                _write_atomically(kept, file.path)
                removed += table.num_rows - kept.num_rows
                rewritten += 1
        return removed, rewritten

    def apply_retention(self, cutoff_ts: float, dry_run: bool = False) -> tuple[int, int]:
        """Remove rows whose event time is before `cutoff_ts`; returns (rows, files changed). A file whose
        every row goes keeps its name (empty), so the range it covered stays known as archived."""
        removed = changed = 0
        partitions = sorted({f.partition for f in self.files()})
        for partition in partitions:
            with contextlib.nullcontext() if dry_run else self.lock(partition):
                for file in self.files(partition):
                    stamps = pq.read_table(file.path, columns=["ts"])["ts"]
                    old = int(pc.sum(pc.less(stamps, cutoff_ts)).as_py() or 0)
                    if old == 0:
                        continue
                    removed += old
                    changed += 1
                    if not dry_run:
                        table = pq.read_table(file.path)
                        _write_atomically(table.filter(pc.greater_equal(table["ts"], cutoff_ts)), file.path)
        return removed, changed


def repartition_archive(archive: EventArchive, partitions: int, partition_of: Callable[[str], int]) -> int:
    """Rewrite the whole archive under a new partition count (`selaras admin repartition`): per day, every
    file's rows go to their visitor's new partition, one file per (day, partition). Written to a staging
    directory that replaces the archive at the end (a crash before leaves the old archive whole; run again).
    Returns the rows rewritten. Reads one day of the log at a time."""
    staging = archive.root.with_name(f"{ARCHIVE_DIR}.repartition")
    retired = archive.root.with_name(f"{ARCHIVE_DIR}.before-repartition")
    if retired.exists() and not archive.root.exists():
        retired.replace(archive.root)  # a run stopped between the two renames below: the old archive is whole
    if staging.exists():
        shutil.rmtree(staging)
    rows = 0
    days = sorted({f.path.parent.parent.name for f in archive.files()})
    for day in days:
        tables = [pq.read_table(f.path) for f in archive.files() if f.path.parent.parent.name == day]
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        numbers = pa.array([partition_of(v) for v in table["visitor_id"].to_pylist()], pa.int64())
        for partition in range(partitions):
            part = table.filter(pc.equal(numbers, partition))
            if part.num_rows == 0:
                continue
            positions = sorted(part["position"].to_pylist(), key=position_order)
            name = f"part-{positions[0]}_{positions[-1]}.parquet"
            _write_atomically(_sorted_for_lookup(part), staging / day / f"partition={partition}" / name)
            rows += part.num_rows
    if archive.root.exists():
        archive.root.replace(retired)
    if staging.exists():
        staging.replace(archive.root)
    shutil.rmtree(retired, ignore_errors=True)
    return rows
