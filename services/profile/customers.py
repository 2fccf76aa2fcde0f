"""`selaras import customers FILE`: a shop's CRM attributes (declared traits) for many customers at once.

The file is CSV with a header, or JSON Lines (both optionally .gz), one customer per line: `visitor_id` and
trait columns (declared in `SELARAS_TRAITS`, see services/common/traits.py; `first_name`, `last_name`,
`city` and `locale` are accepted too). Each line becomes one `profile_update` event through the ingest
path, so traits are checked, logged, folded, exported and erased exactly like traits sent to `/v1/events`.

CSV cells are text: numbers are parsed, booleans read true/false, 1/0, yes/no, dates stay ISO text, and an
empty cell leaves the trait as it was. In JSON Lines values keep their JSON type and `null` clears a trait.
Event ids hash the line's content, so importing the same file again changes nothing. An invalid line stops
the import (every line before it is imported) or, with `skip_invalid`, is counted and reported.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from services.common.api import describe_errors
from services.common.events import Event, EventType
from services.common.traits import TraitSchema, TraitSpec
from services.profile.aggregator.worker import Aggregator
from services.profile.importer import (
    EventBatches,
    ImportReport,
    InvalidInput,
    InvalidLine,
    open_binary,
    record_invalid,
)
from services.profile.ingest import IngestService

VISITOR_COLUMN = "visitor_id"
TRUE_TEXT = frozenset({"true", "1", "yes", "y"})
FALSE_TEXT = frozenset({"false", "0", "no", "n"})


def _csv_value(spec: TraitSpec | None, text: str) -> Any:
    """A CSV cell as the trait's type; text that does not parse stays text, so the schema's check names it."""
    if spec is None or spec.type in ("category", "date"):
        return text
    lowered = text.strip().lower()
    if spec.type == "boolean":
        return True if lowered in TRUE_TEXT else False if lowered in FALSE_TEXT else text
    try:
        return float(lowered)
    except ValueError:
        return text


def _records(path: Path, schema: TraitSchema) -> Iterator[tuple[int, dict[str, Any] | InvalidLine]]:
    """(line number, {column: value} or InvalidLine) for every non-blank line of a CSV or JSONL file."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".csv"):
        with open_binary(path) as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline=""))
            try:
                header = reader.fieldnames or []
                if VISITOR_COLUMN not in header:
                    message = f"the header needs a {VISITOR_COLUMN} column (got {', '.join(header) or 'nothing'})"
                    yield 1, InvalidLine(1, [{"field": "(header)", "message": message}])
                    return
                undeclared = [(c, m) for c in header if c != VISITOR_COLUMN for _, m in schema.errors({c: None})]
                if undeclared:
                    yield 1, InvalidLine(1, [{"field": c, "message": m} for c, m in undeclared])
                    return
                for row in reader:
                    if None in row:
                        message = f"{len(row[None]) + len(header)} cells for {len(header)} columns"
                        yield reader.line_num, InvalidLine(reader.line_num, [{"field": "(line)", "message": message}])
                        continue
                    values = {k: _csv_value(schema.spec(k), v) for k, v in row.items() if v not in ("", None)}
                    yield reader.line_num, values
            except (UnicodeDecodeError, csv.Error, EOFError, gzip.BadGzipFile) as exc:
                line = reader.line_num + 1
                message = f"not readable as UTF-8 CSV: {type(exc).__name__}: {exc}"
                raise InvalidInput(InvalidLine(line, [{"field": "(file)", "message": message}])) from exc
        return
    if not name.endswith((".jsonl", ".ndjson", ".json")):
        raise InvalidInput(InvalidLine(0, [{"field": "(file)", "message": "expected .csv or .jsonl (optionally .gz)"}]))
    with open_binary(path) as handle:
        for number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            try:
                record = orjson.loads(raw_line)
            except orjson.JSONDecodeError as exc:
                yield number, InvalidLine(number, [{"field": "(line)", "message": f"not JSON: {exc}"}])
                continue
            if not isinstance(record, dict):
                yield number, InvalidLine(number, [{"field": "(line)", "message": "expected a JSON object"}])
                continue
            yield number, record


def customer_event(number: int, record: Mapping[str, Any], at: datetime, schema: TraitSchema) -> Event | InvalidLine:
    """One customer line as a `profile_update` event, or the line's errors (field by field)."""
    visitor_id = record.get(VISITOR_COLUMN)
    if not isinstance(visitor_id, str) or not visitor_id.strip():
        return InvalidLine(number, [{"field": VISITOR_COLUMN, "message": "a non-empty visitor_id is required"}])
    properties = {k: v for k, v in record.items() if k != VISITOR_COLUMN}
    errors = [{"field": name, "message": message} for name, message in schema.errors(properties)]
    if errors:
        return InvalidLine(number, errors)
    digest = hashlib.sha256(orjson.dumps([visitor_id, properties], option=orjson.OPT_SORT_KEYS)).hexdigest()
    try:
        return Event(
            event_id=f"customer-{digest[:40]}",
            visitor_id=visitor_id,
            type=EventType.PROFILE_UPDATE,
            timestamp=at,
            properties=properties,
        )
    except ValidationError as exc:
        return InvalidLine(number, describe_errors(exc.errors()))


def import_customers(
    path: Path,
    ingest: IngestService,
    aggregator: Aggregator,
    at: datetime | None = None,
    batch_size: int = 5000,
    skip_invalid: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import a customer file as `profile_update` events dated `at` (default: the ingest clock's now) and fold
    them. Raises InvalidInput (with the report so far) at the first invalid line unless `skip_invalid`."""
    schema = ingest.traits
    if not schema.traits:
        message = "no traits are declared: set SELARAS_TRAITS (see docs/messages.md) before importing customers"
        raise InvalidInput(InvalidLine(0, [{"field": "SELARAS_TRAITS", "message": message}]))
    when = at or datetime.fromtimestamp(ingest.clock.now(), tz=UTC)
    report = ImportReport()
    batches = EventBatches(ingest, aggregator, report, batch_size)

    try:
        for number, parsed in _records(path, schema):
            report.lines = number
            event = parsed if isinstance(parsed, InvalidLine) else customer_event(number, parsed, when, schema)
            if isinstance(event, InvalidLine):
                record_invalid(report, event, skip_invalid)
                continue
            if batches.add(event) and progress:
                progress(number)
    except InvalidInput as exc:
        batches.flush()  # every line before the bad one goes in: "imported up to line N" is exact
        exc.report = report
        raise
    batches.flush()
    if progress:
        progress(report.lines)
    return report
