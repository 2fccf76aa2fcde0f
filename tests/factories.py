"""Test factories: `make_event(**overrides)` and friends build valid payloads with readable defaults."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common.catalog import CatalogItem
from services.common.events import Event
from services.features import schema as F
from services.features.aggregations import SegmentRules, VisitorState, visitor_features

_ids = itertools.count(1)
BASE_TIME = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def make_event_dict(**overrides: Any) -> dict[str, Any]:
    n = next(_ids)
    event: dict[str, Any] = {
        "event_id": f"evt-{n}",
        "visitor_id": "visitor-1",
        "type": "product_view",
        "timestamp": (BASE_TIME + timedelta(seconds=n)).isoformat(),
        "item_id": "p00001",
        "price": 150_000,
        "context": {
            "device": "mobile",
            "channel": "web",
            "city": "Jakarta",
            "locale": "id",
            "session_id": "s1",
        },
    }
    event.update(overrides)
    return {k: v for k, v in event.items() if v is not None}


def make_event(**overrides: Any) -> Event:
    return Event.model_validate(make_event_dict(**overrides))


def make_item(**overrides: Any) -> CatalogItem:
    n = next(_ids)
    item: dict[str, Any] = {
        "item_id": f"item-{n}",
        "kind": "product",
        "title": f"Produk {n}",
        "category": "fashion-pria",
        "brand": "Erigo",
        "price": 150_000,
        "stock": 10,
        "created_at": (BASE_TIME - timedelta(days=30)).isoformat(),
    }
    item.update(overrides)
    return CatalogItem.model_validate(item)


def make_visitor_state(visitor_id: str = "visitor-1", **overrides: Any) -> VisitorState:
    """A visitor who viewed three products on BASE_TIME's day."""
    ts = BASE_TIME.timestamp()
    values: dict[str, Any] = {
        "event_count": 3,
        "first_seen": ts,
        "last_seen": ts + 120,
        "views": [ts, ts + 60, ts + 120],
        "applied_position": "1-0",
    }
    values.update(overrides)
    return VisitorState(visitor_id, **values)


def visitor_row(state: VisitorState, at: datetime = BASE_TIME) -> dict[str, Any]:
    """The visitor's feature row as the aggregator writes it (online and offline), stamped `at`."""
    return {**visitor_features(state, SegmentRules()), F.VISITOR_KEY: state.visitor_id, F.TIMESTAMP_FIELD: at}


def make_shop_events(
    event_prefix: str, visitor_prefix: str, item_prefix: str, visitors: int, count: int, start: int = 0
) -> list[Event]:
    """Views, carts and purchases (quantity 2) of `visitors` visitors over 5 items, one minute apart, in time
    order (one history row per event)."""
    events = []
    for n in range(start, start + count):
        kind = ("product_view", "product_view", "add_to_cart", "purchase")[n % 4]
        events.append(
            make_event(
                event_id=f"{event_prefix}-{n}",
                visitor_id=f"{visitor_prefix}-{n % visitors}",
                type=kind,
                item_id=f"{item_prefix}-{n % 5}",
                timestamp=(BASE_TIME + timedelta(minutes=n)).isoformat(),
                **({"quantity": 2} if kind == "purchase" else {}),
            )
        )
    return events
