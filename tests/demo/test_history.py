"""The browsing-history room on its own: a `HistoryGenerator` over a bare `VisitorModel` yields each visitor's
events in time order, keeps a consistent cart across sessions and never shows a product before its launch."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import datetime, timedelta

import pytest

from services.common.context import WIB
from services.common.events import Event, EventType
from services.demo.history import HistoryGenerator
from services.demo.shop import DemoShop, generate_shop
from services.demo.simulator import Simulator
from services.demo.visitor_model import VisitorModel

NOW = datetime(2025, 3, 31, tzinfo=WIB)
DAYS = 10
START = NOW - timedelta(days=DAYS)


@pytest.fixture(scope="module")
def shop() -> DemoShop:
    return generate_shop(seed=7, now=NOW)


@pytest.fixture(scope="module")
def model(shop: DemoShop) -> VisitorModel:
    return VisitorModel(shop, n_visitors=150, seed=5, start=START)


@pytest.fixture(scope="module")
def by_visitor(model: VisitorModel) -> dict[str, list[Event]]:
    grouped: dict[str, list[Event]] = defaultdict(list)
    for event in HistoryGenerator(model).history(DAYS):
        grouped[event.visitor_id].append(event)
    return grouped


def test_each_visitors_events_are_in_time_order_and_sessions_start_in_sequence(
    model: VisitorModel, by_visitor: dict[str, list[Event]]
) -> None:
    assert len(by_visitor) > 100
    assert set(by_visitor) <= {visitor.visitor_id for visitor in model.visitors}
    for visitor_id, events in by_visitor.items():
        assert [event.ts for event in events] == sorted(event.ts for event in events), visitor_id
        sessions: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            sessions[event.context.session_id or ""].append(event)
        # Sessions are numbered in the order they start (two can overlap when a visitor comes back within
        # minutes); inside one, events keep the order of their ids (an order's purchases share one moment).
        numbered = [f"{visitor_id}-s{number:04d}" for number in range(1, len(sessions) + 1)]
        assert sorted(sessions) == numbered
        starts = [sessions[session_id][0].ts for session_id in numbered]
        assert starts == sorted(starts)
        for session in sessions.values():
            assert [event.event_id for event in session] == sorted(event.event_id for event in session)
            assert all(a.ts <= b.ts for a, b in itertools.pairwise(session))
        assert min(event.event_id for event in events) == f"sim{model.seed}-{visitor_id}-000001"


def test_the_cart_carries_across_sessions_and_checkout_buys_what_is_in_it(
    by_visitor: dict[str, list[Event]],
) -> None:
    purchases = removals = 0
    for visitor_id, events in by_visitor.items():
        cart: dict[str, int] = {}
        # Event ids count a visitor's events in the order they were generated, the order the cart changed in.
        for event in sorted(events, key=lambda event: event.event_id):
            item_id = event.item_id or ""
            if event.type is EventType.ADD_TO_CART:
                assert item_id not in cart, (visitor_id, event.event_id)
                cart[item_id] = event.quantity or 0
            elif event.type is EventType.REMOVE_FROM_CART:
                assert cart.pop(item_id) == event.quantity
                removals += 1
            elif event.type is EventType.PURCHASE:
                assert cart.pop(item_id) == event.quantity, (visitor_id, event.event_id)
                assert str(event.properties["order_id"]).startswith("o")
                purchases += 1
    assert purchases > 50 and removals > 5


def test_no_product_is_viewed_before_its_launch(shop: DemoShop, by_visitor: dict[str, list[Event]]) -> None:
    launched = {item.item_id: item.created_at for item in shop.products}
    views = [event for events in by_visitor.values() for event in events if event.type is EventType.PRODUCT_VIEW]
    for event in views:
        created_at = launched[event.item_id or ""]
        assert created_at is None or created_at <= event.timestamp, event.event_id
    # Not vacuous: products launched inside the window are seen after their launch.
    assert any((launched[event.item_id or ""] or START) > START for event in views)


def test_the_generator_replays_and_the_simulator_delegates_to_it(shop: DemoShop, model: VisitorModel) -> None:
    generator = HistoryGenerator(model)
    first = [event.model_dump(mode="json") for event in generator.history(3)]
    assert first and first == [event.model_dump(mode="json") for event in generator.history(3)]
    simulator = Simulator(shop, n_visitors=150, seed=5, start=START)
    assert first == [event.model_dump(mode="json") for event in simulator.history(3)]
    with pytest.raises(ValueError, match="negative"):
        next(generator.history(-1))
