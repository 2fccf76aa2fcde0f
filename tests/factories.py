"""Test factories: `make_event(**overrides)` and friends build valid payloads with readable defaults."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common.catalog import CatalogItem
from services.common.events import Event

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
