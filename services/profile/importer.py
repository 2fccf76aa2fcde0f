"""Bulk import of events and catalog items from JSON Lines (optionally gzipped), streamed in batches.

Events go through the same path as `POST /v1/events` (validation, idempotent append to the durable log) and
are then folded by the same aggregator, so imported features equal live ones. Files must be in time order
for point-in-time correct features (each event only sees what happened before it); a file out of order is
reported.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import TypeAdapter, ValidationError

from services.common.api import describe_errors
from services.common.catalog import CatalogItem
from services.common.events import Event
from services.profile.service import Aggregator, IngestService

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


class InvalidInput(ValueError):
    def __init__(self, invalid: InvalidLine):
        first = invalid.errors[0] if invalid.errors else {"field": "?", "message": "invalid"}
        super().__init__(f"line {invalid.line}: {first['field']}: {first['message']}")
        self.invalid = invalid


def open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def read_jsonl(path: Path, adapter: TypeAdapter[Any]) -> Iterator[tuple[int, Any | InvalidLine]]:
    """(line number, parsed model or InvalidLine) for every non-blank line."""
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, adapter.validate_python(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                yield number, InvalidLine(number, [{"field": "(line)", "message": f"not JSON: {exc}"}])
            except ValidationError as exc:
                yield number, InvalidLine(number, describe_errors(exc.errors()))


def import_events(
    path: Path,
    ingest: IngestService,
    aggregator: Aggregator,
    batch_size: int = 5000,
    skip_invalid: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Stream the file in batches: validate, append to the log, fold. Memory stays bounded by the batch."""
    report = ImportReport()
    batch: list[Event] = []
    last_ts = float("-inf")

    def flush() -> None:
        if not batch:
            return
        result = ingest.ingest(batch)
        report.accepted += result.accepted
        report.duplicates += result.duplicates
        while aggregator.run_once(batch_size * 2).events:
            pass
        batch.clear()

    for number, parsed in read_jsonl(path, EVENT_ADAPTER):
        report.lines = number
        if isinstance(parsed, InvalidLine):
            report.invalid_count += 1
            if len(report.invalid) < 100:
                report.invalid.append(parsed)
            if not skip_invalid:
                raise InvalidInput(parsed)
            continue
        if parsed.ts < last_ts:
            report.out_of_order += 1
        last_ts = max(last_ts, parsed.ts)
        batch.append(parsed)
        if len(batch) >= batch_size:
            flush()
            if progress:
                progress(number)
    flush()
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
    for number, parsed in read_jsonl(path, ITEM_ADAPTER):
        report.lines = number
        if isinstance(parsed, InvalidLine):
            report.invalid_count += 1
            if len(report.invalid) < 100:
                report.invalid.append(parsed)
            if not skip_invalid:
                raise InvalidInput(parsed)
            continue
        batch.append(parsed)
        if len(batch) >= batch_size:
            upsert(batch)
            report.accepted += len(batch)
            batch = []
    if batch:
        upsert(batch)
        report.accepted += len(batch)
    return report
