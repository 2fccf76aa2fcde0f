"""Bulk import of events and catalog items from JSON Lines or CSV (optionally gzipped), streamed in batches.

Events go through the same path as `POST /v1/events` (validation, idempotent append to the durable log) and
are then folded by the same aggregator, so imported features equal live ones. Files must be in time order
for point-in-time correct features (each event only sees what happened before it): the first event older than
an earlier line stops the import with a clear message (everything before it is imported and folded in
order; nothing is folded out of order), even with `skip_invalid`.

Without `skip_invalid` the import stops at the first invalid line; every line before it is imported (a
re-run is harmless: events are deduplicated by event_id). A truncated or corrupt gzip file always stops.
"""

from __future__ import annotations

import gzip
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from services.common.api import describe_errors
from services.common.catalog import CatalogItem
from services.common.errors import StorageUnavailable
from services.common.events import Event, future_timestamp_error
from services.common.tabular import CsvProblem, csv_records, is_csv
from services.profile.aggregator.partition import EntryFailed
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService

log = logging.getLogger(__name__)
T = TypeVar("T")
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
ITEM_ADAPTER: TypeAdapter[CatalogItem] = TypeAdapter(CatalogItem)


@dataclass
class InvalidLine:
    line: int
    errors: list[dict[str, Any]]


@dataclass
class ImportReport:
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    invalid: list[InvalidLine] = field(default_factory=list)
    out_of_order: int = 0
    invalid_count: int = 0
    folded_by_live_aggregator: bool = False  # another process held the log's lease and folded the events


class InvalidInput(ValueError):
    def __init__(self, invalid: InvalidLine):
        first = invalid.errors[0] if invalid.errors else {"field": "?", "message": "invalid"}
        super().__init__(f"line {invalid.line}: {first['field']}: {first['message']}")
        self.invalid = invalid
        self.report: ImportReport | None = None  # what was imported before the import stopped


def open_binary(path: Path) -> IO[bytes] | gzip.GzipFile:
    # Bytes, not text: orjson validates UTF-8 itself, so a bad byte is reported with its line number
    # instead of aborting the whole file with a decode error.
    if path.suffix == ".gz":
        return gzip.GzipFile(path, "rb")
    return path.open("rb")


def read_jsonl(path: Path, adapter: TypeAdapter[Any]) -> Iterator[tuple[int, Any | InvalidLine]]:
    """(line number, parsed model or InvalidLine) for every non-blank line.

    Raises InvalidInput when the file itself cannot be read further (truncated or corrupt gzip)."""
    number = 0
    with open_binary(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, adapter.validate_python(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    yield number, InvalidLine(number, [{"field": "(line)", "message": f"not JSON: {exc}"}])
                except ValidationError as exc:
                    yield number, InvalidLine(number, describe_errors(exc.errors()))
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            message = f"the file is truncated or corrupt after line {number}: {type(exc).__name__}"
            raise InvalidInput(InvalidLine(number + 1, [{"field": "(file)", "message": message}])) from exc


# Catalog fields that are lists: in CSV their values are separated by "|" (services/common/tabular.py).
CATALOG_LIST_FIELDS = frozenset(
    {"tags", *(f"targeting.{name}" for name in ("categories", "devices", "cities", "personas", "segments", "hours"))}
)


def read_records(
    path: Path, adapter: TypeAdapter[Any], list_fields: frozenset[str] = frozenset()
) -> Iterator[tuple[int, Any | InvalidLine]]:
    """JSON Lines or, for `.csv`/`.csv.gz`, CSV with a header (services/common/tabular.py): the same
    validation and the same (line number, model or InvalidLine) for both."""
    if not is_csv(path.name):
        yield from read_jsonl(path, adapter)
        return
    number = 1
    with open_binary(path) as handle:
        try:
            for number, record in csv_records(handle, list_fields):
                try:
                    yield number, adapter.validate_python(record)
                except ValidationError as exc:
                    yield number, InvalidLine(number, describe_errors(exc.errors()))
        except CsvProblem as exc:
            raise InvalidInput(InvalidLine(exc.line, [{"field": "(file)", "message": exc.message}])) from exc
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            message = f"the file is truncated or corrupt after line {number}: {type(exc).__name__}"
            raise InvalidInput(InvalidLine(number + 1, [{"field": "(file)", "message": message}])) from exc


def _retrying(action: Callable[[], T], attempts: int = 5) -> T:
    """Retry a storage call that timed out (a loaded Redis can take longer than the fail-fast timeout on a
    big batch). Both calls are safe to repeat: appends are idempotent on event_id and the aggregator is
    at-least-once with an exactly-once effect. A retried append whose first try did land reports its
    events as duplicates. A log entry that keeps failing to fold goes to the dead letters after a few tries."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except (StorageUnavailable, EntryFailed):
            if attempt == attempts:
                raise
            log.warning("storage unavailable during import, retrying (%d/%d)", attempt, attempts)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def fold_or_wait(aggregator: Aggregator, batch_size: int) -> bool:
    """Fold the log to its end; True when this aggregator folded all of it. It folds the partitions whose
    lease it can take (its share, next to running aggregators); the others are folded by their holders, which
    this waits for (taking a partition over if its holder stops renewing it). Never a second consumer."""
    repository = aggregator.repository
    folded_here = True
    while True:
        outcome = _retrying(lambda: aggregator.run_once(batch_size))
        if outcome.events:
            continue
        if len(aggregator.held_partitions()) < len(aggregator.partitions):
            folded_here = False
        if not _retrying(repository.unfolded_partitions):
            return folded_here
        time.sleep(0.2)


# Events appended before the importer folds the log: the fold's cost per batch (merging every touched item's
# statistics, writing its row) is paid once per item and fold, so folding 20,000 events at once instead of
# every 5,000 appended cut the import's CPU per event (docs/data-path.md, "Folding speed").
FOLD_EVERY = 20_000
# The largest micro-batch one partition folds at a time during an import (the commit record holds its states).
IMPORT_FOLD_BATCH = 10_000


class EventBatches:
    """Events appended through the ingest path a batch at a time and folded every `fold_every` appended events,
    counted in `report`: the part every event import shares (events, customers). The importer's memory stays
    bounded by the batch (the events wait in the log until they are folded)."""

    def __init__(
        self,
        ingest: IngestService,
        aggregator: Aggregator,
        report: ImportReport,
        batch_size: int,
        fold_every: int = FOLD_EVERY,
    ):
        self.ingest = ingest
        self.aggregator = aggregator
        self.report = report
        self.batch_size = batch_size
        self.fold_every = max(fold_every, batch_size)
        self.batch: list[Event] = []
        self.unfolded = 0  # appended since the last fold
        self.folded_here = True  # whether the last fold folded the log itself (else a running aggregator did)

    def add(self, event: Event) -> bool:
        """Queue one event; True when that filled the batch and it was stored (and folded, every `fold_every`)."""
        self.batch.append(event)
        if len(self.batch) < self.batch_size:
            return False
        self._append()
        if self.unfolded >= self.fold_every:
            self._fold()
        return True

    def flush(self) -> None:
        """Store what is queued and fold the log to its end."""
        self._append()
        if self.unfolded:
            self._fold()

    def _append(self) -> None:
        if not self.batch:
            return
        result = _retrying(lambda: self.ingest.ingest(self.batch))
        self.report.accepted += result.accepted
        self.report.duplicates += result.duplicates
        self.unfolded += len(self.batch)
        self.batch.clear()

    def _fold(self) -> None:
        self.folded_here = fold_or_wait(self.aggregator, IMPORT_FOLD_BATCH)
        self.unfolded = 0


def record_invalid(report: ImportReport, invalid: InvalidLine, skip_invalid: bool) -> None:
    """Count an invalid line (the first 100 are kept for the report); stop the import unless told to skip."""
    report.invalid_count += 1
    if len(report.invalid) < 100:
        report.invalid.append(invalid)
    if not skip_invalid:
        raise InvalidInput(invalid)


def import_events(
    path: Path,
    ingest: IngestService,
    aggregator: Aggregator,
    batch_size: int = 5000,
    skip_invalid: bool = False,
    progress: Callable[[int], None] | None = None,
    fold_every: int = FOLD_EVERY,
) -> ImportReport:
    """Stream the file in batches: validate, append to the log, fold (every `fold_every` appended events).
    Memory stays bounded by the batch."""
    report = ImportReport()
    batches = EventBatches(ingest, aggregator, report, batch_size, fold_every)
    last_ts = float("-inf")

    try:
        for number, parsed in read_records(path, EVENT_ADAPTER):
            report.lines = number
            if isinstance(parsed, InvalidLine):
                record_invalid(report, parsed, skip_invalid)
                continue
            future = future_timestamp_error(parsed, ingest.clock.now(), ingest.max_skew_s)
            if future is not None:
                record_invalid(report, InvalidLine(number, [{"field": "timestamp", "message": future}]), skip_invalid)
                continue
            traits = ingest.trait_errors([parsed])
            if traits:
                errors = [{"field": e["field"], "message": e["message"]} for e in traits]
                record_invalid(report, InvalidLine(number, errors), skip_invalid)
                continue
            if parsed.ts < last_ts:
                report.out_of_order += 1
                message = (
                    f"{parsed.timestamp.isoformat()} is earlier than an event on an earlier line: the file must be "
                    "sorted by timestamp (events already imported are deduplicated on a re-run)"
                )
                raise InvalidInput(InvalidLine(number, [{"field": "timestamp", "message": message}]))
            last_ts = parsed.ts
            if batches.add(parsed) and progress:
                progress(number)
    except InvalidInput as exc:
        # Everything before the bad line goes in, so "imported up to line N" is exact.
        batches.flush()
        exc.report = report
        raise
    batches.flush()
    if not batches.folded_here:
        # A running aggregator held the log's lease: it folded what was appended, on its own clock, and ages
        # item windows itself.
        report.folded_by_live_aggregator = True
    else:
        # Item windows as of the end of the file (items last seen early in it are aged to that moment).
        _retrying(lambda: aggregator.age_item_rows(force=True))
    if progress:
        progress(report.lines)
    return report


def import_catalog(
    path: Path,
    upsert: Callable[[list[CatalogItem]], None],
    batch_size: int = 2000,
    skip_invalid: bool = False,
) -> ImportReport:
    report = ImportReport()
    batch: list[CatalogItem] = []
    try:
        for number, parsed in read_records(path, ITEM_ADAPTER, CATALOG_LIST_FIELDS):
            report.lines = number
            if isinstance(parsed, InvalidLine):
                record_invalid(report, parsed, skip_invalid)
                continue
            batch.append(parsed)
            if len(batch) >= batch_size:
                upsert(batch)
                report.accepted += len(batch)
                batch = []
    except InvalidInput as exc:
        if batch:
            upsert(batch)
            report.accepted += len(batch)
        exc.report = report
        raise
    if batch:
        upsert(batch)
        report.accepted += len(batch)
    return report
