"""One index update rule: the aggregator (real Redis log), the in-process bulk fold and the training replay
fold the same events into the same co-visitation and popularity indexes (and the same visitor rows)."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from services.common.events import Event
from services.features.aggregations import ItemInfo, SegmentRules, visitor_features
from services.profile.aggregator.bulk_fold import OutOfOrder, fold_history
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from services.recommend.training.event_columns import LoggedEvent
from services.recommend.training.replay import Replay
from tests.factories import BASE_TIME, make_event, make_item

TYPES = ("product_view", "product_view", "add_to_cart", "purchase", "click", "search")


def history(n: int = 400, seed: int = 3) -> list[Event]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        kind = rng.choice(TYPES)
        fields: dict[str, Any] = {
            "visitor_id": f"v{rng.randrange(12)}",
            "type": kind,
            "item_id": f"p{rng.randrange(25)}",
            "timestamp": (BASE_TIME + timedelta(minutes=7 * i)).isoformat(),
            "context": {"device": rng.choice(["mobile", "desktop"]), "city": rng.choice(["Jakarta", "Medan"])},
        }
        if kind == "search":
            fields.update(query="sepatu", item_id=None)
        events.append(make_event(**fields))
    return events


def test_aggregator_bulk_fold_and_training_replay_build_the_same_indexes(
    settings_factory: Callable[..., Any],
) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings)
    catalog = [make_item(item_id=f"p{i}", category=f"c{i % 4}", brand=f"b{i % 3}") for i in range(25)]
    events = history()
    repository = ProfileRepository.open(settings)
    try:
        repository.upsert_catalog(catalog)
        aggregator = Aggregator(repository, SegmentRules(), settings.consent_defaults(), offline_rows=False)
        IngestService(repository).ingest(events)
        while aggregator.run_once(1000).events:
            pass
        stored = repository.visitor_states(sorted({e.visitor_id for e in events}))
        # As stored: each partition's batches added their share (merged in another order than time order).
        covisitation, popularity = repository.load_indexes()
    finally:
        repository.close()

    info = {i.item_id: ItemInfo(i.category, i.brand, i.price, i.discount) for i in catalog}
    folded = fold_history(events, info)
    replay = Replay()
    for event in events:
        replay.observe(LoggedEvent.of(event))

    assert covisitation.neighbours  # purchases, carts, views and clicks all taught it something
    assert folded.covisitation.neighbours == replay.covisitation.neighbours
    assert folded.popularity.scores == replay.popularity.scores
    # Shares added in another order: the same sums up to rounding.
    assert flat(covisitation.neighbours) == pytest.approx(flat(folded.covisitation.neighbours), rel=1e-9)
    assert flat(popularity.scores) == pytest.approx(flat(folded.popularity.scores), rel=1e-9)
    at = events[-1].ts
    for visitor_id, state in stored.items():
        assert visitor_features(folded.visitors[visitor_id], SegmentRules(), at) == visitor_features(
            state, SegmentRules(), at
        )
        assert replay.recent[visitor_id] == state.recent_items


def flat(index: dict[str, dict[str, Any]]) -> dict[tuple[str, str, int], float]:
    """Index rows (neighbour weights, or [score, ts] per item) as one flat mapping of numbers."""
    return {
        (key, item, n): float(value)
        for key, row in index.items()
        for item, entry in row.items()
        for n, value in enumerate(entry if isinstance(entry, list) else [entry])
    }


def test_co_visitation_is_directional_and_learns_from_purchases_alone() -> None:
    events = [
        make_event(
            visitor_id=f"v{v}", type="purchase", item_id=item, timestamp=(BASE_TIME + timedelta(days=i)).isoformat()
        )
        for v in range(3)
        for i, item in enumerate(["a", "b", "c"])
    ]
    events.sort(key=lambda e: e.ts)
    folded = fold_history(events, {})
    after_a = dict(folded.covisitation.top("a", 10))
    after_b = dict(folded.covisitation.top("b", 10))
    # b follows a (distance 1) and c follows a (distance 2): 1/d per visitor; the reverse direction is weaker.
    assert after_a == pytest.approx({"b": 3.0, "c": 1.5})
    assert after_b["c"] == pytest.approx(3.0) and after_b["a"] == pytest.approx(1.5)


def test_events_out_of_time_order_are_refused() -> None:
    events = history(20)
    with pytest.raises(OutOfOrder, match="sort by time"):
        fold_history([events[1], events[0], *events[2:]], {})
