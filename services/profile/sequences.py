"""Interaction histories without timestamps ("user item item ..." per line, oldest first) and an item ->
attribute ids JSON: the shape public benchmark splits and many order exports come in.

They become the project's own catalog items and purchase events: each user's interactions in order, with
synthetic increasing timestamps (`SYNTHETIC_START + position * SYNTHETIC_STEP_S`, users interleaved by
position), so a file written from them is in time order and folds like a live log. Order is all the file
knows; the synthetic spacing (one minute) keeps every interaction inside the windows of the item statistics
and lets no popularity decay favour long histories.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from services.common.catalog import MAX_TAGS, CatalogItem
from services.common.events import Event, EventType

SYNTHETIC_START = datetime(2020, 1, 1, tzinfo=UTC)
SYNTHETIC_STEP_S = 60.0
# An attribute carried by more than this share of the items is the catalog's root, not a category.
ROOT_ATTRIBUTE_SHARE = 0.4


class SequenceFileError(ValueError):
    """A history file that cannot be read as "user item item ..." lines."""


@dataclass(frozen=True)
class Histories:
    """Users' item sequences (oldest first) and item attribute ids."""

    users: list[str]
    sequences: list[list[str]]
    attributes: Mapping[str, Sequence[int]]

    @property
    def interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def item_ids(self) -> list[str]:
        """Every item that occurs in a history or in the attributes, in first-seen order."""
        seen: dict[str, None] = {}
        for sequence in self.sequences:
            for item in sequence:
                seen.setdefault(item, None)
        for item in self.attributes:
            seen.setdefault(item, None)
        return list(seen)

    def truncated(self, held_out: int) -> Histories:
        """Every history without its last `held_out` interactions (leave-last-out training data)."""
        return Histories(self.users, [s[: len(s) - held_out] for s in self.sequences], self.attributes)


def read_histories(path: Path, attributes_path: Path | None = None) -> Histories:
    users: list[str] = []
    sequences: list[list[str]] = []
    seen: set[str] = set()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            parts = raw.decode("utf-8", errors="strict").split()
            if not parts:
                continue
            if len(parts) < 2:
                raise SequenceFileError(f"{path.name} line {number}: a user id and at least one item id expected")
            if parts[0] in seen:
                raise SequenceFileError(f"{path.name} line {number}: user {parts[0]} appears twice")
            seen.add(parts[0])
            users.append(parts[0])
            sequences.append(parts[1:])
    attributes: dict[str, list[int]] = {}
    if attributes_path is not None:
        loaded = orjson.loads(attributes_path.read_bytes())
        if not isinstance(loaded, dict):
            raise SequenceFileError(f"{attributes_path.name}: an object of item id -> attribute ids expected")
        attributes = {str(k): [int(a) for a in v] for k, v in loaded.items()}
    return Histories(users, sequences, attributes)


def catalog_items(histories: Histories) -> list[CatalogItem]:
    """One product per item. Attributes are anonymous ids: the most specific shared one (after the root that
    most items carry) is the category, the last one the brand (the order the published splits use), and
    every attribute is a tag. Prices are unknown: 0."""
    counts = Counter(a for values in histories.attributes.values() for a in set(values))
    total = max(len(histories.attributes), 1)
    roots = {a for a, n in counts.items() if n / total > ROOT_ATTRIBUTE_SHARE}
    items = []
    for item_id in histories.item_ids():
        values = [a for a in histories.attributes.get(item_id, ()) if a not in roots]
        items.append(
            CatalogItem(
                item_id=item_id,
                title=f"item {item_id}",
                category=f"a{values[0]}" if values else None,
                brand=f"a{values[-1]}" if len(values) > 1 else None,
                price=0.0,
                created_at=SYNTHETIC_START - timedelta(days=365),
                tags=[f"a{a}" for a in values[:MAX_TAGS]],
            )
        )
    return items


def synthetic_ts(position: int) -> datetime:
    return SYNTHETIC_START + timedelta(seconds=position * SYNTHETIC_STEP_S)


def purchase_events(histories: Histories) -> Iterator[Event]:
    """Every interaction as a purchase event, in time order (by position, then by user as listed)."""
    longest = max((len(s) for s in histories.sequences), default=0)
    for position in range(longest):
        at = synthetic_ts(position)
        for user, sequence in zip(histories.users, histories.sequences, strict=True):
            if position < len(sequence):
                yield Event(
                    event_id=f"h:{user}:{position}",
                    visitor_id=user,
                    type=EventType.PURCHASE,
                    timestamp=at,
                    item_id=sequence[position],
                    quantity=1,
                )


def write_jsonl(histories: Histories, events_path: Path, catalog_path: Path) -> tuple[int, int]:
    """The histories as the importer's JSON Lines files (`selaras import catalog` / `import events`)."""
    items = catalog_items(histories)
    with catalog_path.open("wb") as handle:
        for item in items:
            handle.write(item.model_dump_json(exclude_none=True).encode() + b"\n")
    count = 0
    with events_path.open("wb") as handle:
        for event in purchase_events(histories):
            handle.write(event.model_dump_json(exclude_none=True).encode() + b"\n")
            count += 1
    return len(items), count
