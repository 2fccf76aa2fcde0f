"""The demo's files: events and catalog items as JSON Lines (optionally gzipped), one object per line."""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from services.common.catalog import CatalogItem
from services.common.events import Event


def _row(row: Event | CatalogItem | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(row, Event | CatalogItem):
        return row.model_dump(mode="json", exclude_none=True)
    return row


def write_jsonl(rows: Iterable[Event | CatalogItem | Mapping[str, Any]], path: str | Path) -> int:
    """Write one JSON object per line (gzip when the path ends with .gz); returns the number of rows.

    Events and catalog items are written as `model_dump(mode="json", exclude_none=True)`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    # Level 5 compresses almost as well as 9 and several times faster.
    gz = target.suffix == ".gz"
    with gzip.open(target, "wb", compresslevel=5) if gz else target.open("wb") as handle:
        for row in rows:
            handle.write(orjson.dumps(_row(row)) + b"\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read what `write_jsonl` wrote (gzip when the path ends with .gz)."""
    source = Path(path)
    with gzip.open(source, "rb") if source.suffix == ".gz" else source.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield orjson.loads(line)
