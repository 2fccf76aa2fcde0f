"""`Event.ts` is computed once per event (a fold reads it many times) and never outlives a change of the
timestamp: `model_copy(update=...)` drops the cached value, copies without an update keep the same time, and
the cache takes no part in equality, dumps or the JSON schema."""

from __future__ import annotations

import copy
import pickle
from datetime import UTC, datetime, timedelta

from services.common.events import Event, not_after
from tests.factories import BASE_TIME, make_event


def test_the_cached_event_time_follows_every_copy() -> None:
    event = make_event(timestamp=BASE_TIME.isoformat())
    assert event.ts == BASE_TIME.timestamp() and "ts" in event.__dict__  # cached
    later = BASE_TIME + timedelta(hours=5)
    moved = event.model_copy(update={"timestamp": later})
    assert moved.ts == later.timestamp() and event.ts == BASE_TIME.timestamp()
    renamed = event.model_copy(update={"event_id": "other"})
    assert renamed.ts == event.ts
    for same in (copy.copy(event), copy.deepcopy(event), pickle.loads(pickle.dumps(event)), event.model_copy()):
        assert same.ts == event.ts and same == event
    fresh = Event.model_validate(event.model_dump())
    assert fresh == event and "ts" not in fresh.__dict__  # equal whether or not the time was read
    assert "ts" not in event.model_dump() and "ts" not in Event.model_json_schema()["properties"]


def test_a_clamped_event_gets_the_clamped_time() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    ahead = make_event(timestamp=(now + timedelta(days=3)).isoformat())
    assert ahead.ts > now.timestamp()  # cached before the clamp
    clamped = not_after(ahead, now.timestamp())
    assert clamped.ts == clamped.timestamp.timestamp() <= now.timestamp()
