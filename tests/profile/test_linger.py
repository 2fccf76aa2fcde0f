"""Under steady traffic the aggregator folds in batches, not event by event: after a batch that was not full it
waits `aggregator_linger_s` before reading again (a batch costs milliseconds beyond its events). Everything is
still folded exactly once."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient

from services.common.clock import FixedClock
from services.features import schema as F
from services.features.store import offline_parts
from services.profile.app import create_app
from services.profile.settings import ProfileSettings
from tests.conftest import wait_for
from tests.factories import BASE_TIME, make_event_dict

CLOCK = FixedClock(BASE_TIME + timedelta(days=1))
BURSTS, PER_BURST, GAP_S = 16, 3, 0.05


def test_steady_traffic_is_folded_in_a_few_batches_and_exactly_once(settings_factory: Callable[..., Any]) -> None:
    settings: ProfileSettings = settings_factory(
        ProfileSettings, aggregator_idle_s=0.01, aggregator_linger_s=0.6, log_partitions=1
    )
    sent: list[dict[str, Any]] = []
    with TestClient(create_app(settings, CLOCK)) as client:
        state = client.app.state.profile  # type: ignore[attr-defined]
        for burst in range(BURSTS):  # ~0.8 s of traffic, a burst every 50 ms
            events = [
                make_event_dict(
                    event_id=f"lg-{burst}-{n}",
                    visitor_id=f"lg-visitor-{n}",
                    item_id=f"lg-item-{burst % 5}",
                    timestamp=(BASE_TIME + timedelta(seconds=burst * 10 + n)).isoformat(),
                )
                for n in range(PER_BURST)
            ]
            assert client.post("/v1/events", json={"events": events}).status_code == 202
            sent += events
            time.sleep(GAP_S)
        per_visitor = Counter(e["visitor_id"] for e in sent)

        def folded() -> bool:
            states = state.repository.visitor_states(list(per_visitor))
            return sum(s.event_count for s in states.values()) == len(sent)

        assert wait_for(folded, 30)
        states = state.repository.visitor_states(list(per_visitor))
        assert {v: s.event_count for v, s in states.items()} == dict(per_visitor), "each event folded once"
        item_views = {
            item_id: s.buckets.get("views", {})
            for item_id, s in state.repository.item_states([f"lg-item-{i}" for i in range(5)]).items()
        }
        assert sum(sum(hours.values()) for hours in item_views.values()) == len(sent)
        # One visitor part file per batch. Without lingering the 16 bursts arrive 50 ms apart and the aggregator,
        # polling every 10 ms, folds each on its own; with 0.6 s of lingering ~0.8 s of traffic makes at most a
        # first batch and two lingered ones (a slower machine makes fewer, never more).
        batches = len(offline_parts(settings.offline_dir, F.VISITOR_VIEW))
        assert 1 <= batches <= 3, batches
