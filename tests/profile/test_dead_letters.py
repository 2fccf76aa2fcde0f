"""Poison log entries on real Redis + Feast: an entry that cannot be decoded or validated (a corrupt payload,
a schema rolled back) is retried a few times, then set aside in the stored dead-letter list, counted in
/metrics and reported by /readyz; the aggregator moves on and folds every other event exactly once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson
from fastapi.testclient import TestClient

from services.common.clock import FixedClock
from services.common.storage import PendingEvent
from services.profile.app import create_app
from services.profile.settings import ProfileSettings
from tests.conftest import wait_for
from tests.factories import BASE_TIME, make_event_dict

CLOCK = FixedClock(BASE_TIME + timedelta(days=1))
POISON = [
    PendingEvent("poison-1", "dl-visitor-0", b"\xff not JSON at all"),
    # Valid JSON of an event type this version does not know (what a rolled-back schema leaves in the log).
    PendingEvent("poison-2", "dl-visitor-1", orjson.dumps({"at": 0.0, "event": {"event_id": "p2", "type": "x"}})),
]


def events(start: int, count: int) -> list[dict[str, Any]]:
    return [
        make_event_dict(
            event_id=f"dl-{n}",
            visitor_id=f"dl-visitor-{n % 3}",
            item_id=f"dl-item-{n % 4}",
            timestamp=(BASE_TIME + timedelta(minutes=n)).isoformat(),
        )
        for n in range(start, start + count)
    ]


def test_poison_entries_go_to_the_dead_letters_and_the_aggregator_moves_on(
    settings_factory: Callable[..., Any],
) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings, aggregator_idle_s=0.01, aggregator_batch=50)
    with TestClient(create_app(settings, CLOCK)) as client:
        state = client.app.state.profile  # type: ignore[attr-defined]
        first, second = events(0, 30), events(30, 30)
        assert client.post("/v1/events", json={"events": first}).status_code == 202
        state.repository.append(POISON)
        assert client.post("/v1/events", json={"events": second}).status_code == 202

        def folded() -> bool:
            states = state.repository.visitor_states([f"dl-visitor-{i}" for i in range(3)])
            return sum(s.event_count for s in states.values()) == 60

        assert wait_for(folded, 30), "the aggregator did not get past the poison entries"
        per_visitor = Counter(e["visitor_id"] for e in first + second)
        states = state.repository.visitor_states(list(per_visitor))
        assert {v: s.event_count for v, s in states.items()} == dict(per_visitor)
        items = {s.item_id: sum(s.buckets["views"].values()) for s in state.repository.all_item_states()}
        assert items == dict(Counter(e["item_id"] for e in first + second))

        letters = sorted(state.repository.dead_letters(), key=lambda d: d["position"])
        assert len(letters) == 2
        assert all(letter["attempts"] == state.aggregator.max_attempts for letter in letters)
        assert "JSON" in letters[0]["error"] or "JSON" in letters[1]["error"]

        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["dead_letters"] == 2
        assert ready.json()["aggregator_lag_s"] == 0.0
        # Per partition, labelled by number: each poison entry is in its visitor's partition.
        expected = Counter(str(state.repository.store.partition_of(p.visitor_id)) for p in POISON)
        by_partition = {p: n for p, n in ready.json()["dead_letters_by_partition"].items() if n}
        assert by_partition == dict(expected)

        def metric(name: str) -> dict[str, float]:
            """The metric's value per partition label."""
            values = {}
            for line in client.get("/metrics").text.splitlines():
                if line.startswith(name + "{"):
                    values[line.split('partition="')[1].split('"')[0]] = float(line.split()[1])
            return values

        def stored_dead_letters() -> dict[str, float]:
            return {p: n for p, n in metric("selaras_aggregator_dead_letters_stored").items() if n}

        assert wait_for(lambda: stored_dead_letters() == {p: float(n) for p, n in expected.items()}, 5)
        assert sum(metric("selaras_aggregator_dead_letters_total").values()) >= 2
        assert set(metric("selaras_aggregator_lag_seconds").values()) == {0.0}
