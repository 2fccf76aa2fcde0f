"""The reactions room on its own: `Reactions` over a bare `VisitorModel` reacts only to what was shown, sends
nothing and sending a message share one organic purchase, visits stay in their window, and answers do not
depend on the order they are asked in."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import numpy as np
import pytest

from services.common.context import WIB
from services.common.events import Event, EventType
from services.demo.reactions import Reactions, ShownItem
from services.demo.shop import DemoShop, generate_shop
from services.demo.visitor_model import VisitorModel

NOW = datetime(2025, 3, 31, tzinfo=WIB)
START = NOW - timedelta(days=14)
# A payday evening in WIB: visitors are attentive and buy more, so reactions are frequent.
PAYDAY_EVENING = datetime(2025, 3, 28, 20, 0, tzinfo=WIB)


@pytest.fixture(scope="module")
def shop() -> DemoShop:
    return generate_shop(seed=7, now=NOW)


@pytest.fixture(scope="module")
def model(shop: DemoShop) -> VisitorModel:
    return VisitorModel(shop, n_visitors=80, seed=3, start=START)


def _favourites(model: VisitorModel, visitor_id: str, count: int) -> list[str]:
    """The visitor's best-liked products in stock: the ones most likely to be clicked and bought."""
    utilities = np.where(model.in_stock, model.utilities(visitor_id), -np.inf)
    return [model.products[int(column)].item_id for column in np.argsort(-utilities, kind="stable")[:count]]


def test_a_slot_gets_clicks_only_on_shown_items_and_carts_only_after_clicks(
    shop: DemoShop, model: VisitorModel
) -> None:
    reactions = Reactions(model)
    banner = shop.banners[0].item_id
    seen: Counter[EventType] = Counter()
    for visitor in model.visitors:
        favourites = _favourites(model, visitor.visitor_id, 5)
        # Gaps in the positions and one product shown twice: each click echoes where it was shown.
        shown = [ShownItem(item_id, position) for item_id, position in zip(favourites, (0, 2, 3, 5, 8), strict=True)]
        shown += [ShownItem(favourites[0], 9), ShownItem(banner, 1, "banner")]
        where = {(entry.item_id, entry.position): entry.kind for entry in shown}
        for trial in range(5):
            answer = reactions.respond(visitor.visitor_id, shown, PAYDAY_EVENING, f"rec-{trial}", "home")
            assert [event.ts for event in answer] == sorted(event.ts for event in answer)
            assert len({event.event_id for event in answer}) == len(answer)
            clicked: set[tuple[str, int]] = set()
            carted: set[tuple[str, int]] = set()
            for event in sorted(answer, key=lambda event: event.ts):
                seen[event.type] += 1
                assert event.visitor_id == visitor.visitor_id and event.recommendation_id == f"rec-{trial}"
                assert event.timestamp > PAYDAY_EVENING and event.properties["slot"] == "home"
                if event.type is EventType.CLICK:
                    key = (event.item_id or "", int(event.properties["position"] or 0))
                    assert event.properties["kind"] == where[key]
                    clicked.add(key)
                elif event.type is EventType.ADD_TO_CART:
                    assert event.item_id != banner
                    clicks = [key for key in clicked - carted if key[0] == event.item_id]
                    assert clicks, event.event_id
                    carted.add(clicks[0])
                else:
                    assert event.type is EventType.PURCHASE
                    assert any(key[0] == event.item_id for key in carted)
    assert seen[EventType.CLICK] > seen[EventType.ADD_TO_CART] > seen[EventType.PURCHASE] > 0


def test_respond_refuses_unknown_visitors_and_naive_times(model: VisitorModel) -> None:
    reactions = Reactions(model)
    shown = [ShownItem(model.products[0].item_id, 0)]
    with pytest.raises(KeyError, match="unknown visitor"):
        reactions.respond("nobody", shown, PAYDAY_EVENING, "rec", "home")
    with pytest.raises(ValueError, match="timezone-aware"):
        reactions.respond(model.visitors[0].visitor_id, shown, datetime(2025, 3, 28, 20), "rec", "home")


def test_sending_nothing_and_sending_a_message_share_the_organic_purchase(shop: DemoShop, model: VisitorModel) -> None:
    reactions = Reactions(model)
    message = next(item.item_id for item in shop.messages if item.message and "push" in item.message.channels)
    organic = replaced = 0
    for visitor in model.visitors:
        for trial in range(10):
            recommendation_id = f"msg-{trial}"
            nothing = reactions.respond_no_message(visitor.visitor_id, PAYDAY_EVENING, recommendation_id)
            sent = reactions.respond_message(
                visitor.visitor_id, message, None, "push", PAYDAY_EVENING, recommendation_id
            )
            attributed = [event for event in sent if event.recommendation_id is not None]
            unattributed = [event for event in sent if event.recommendation_id is None]
            assert all(event.properties["source"] == "organic" for event in nothing)
            if any(event.type is EventType.PURCHASE for event in attributed):
                # The visitor buys once: the purchase they would have made anyway came through the message.
                assert unattributed == []
                replaced += bool(nothing)
            else:
                assert unattributed == nothing
            organic += bool(nothing)
    assert organic > 20 and replaced > 0


def test_a_visit_views_then_maybe_buys_one_product_inside_the_window(model: VisitorModel) -> None:
    reactions = Reactions(model)
    bought = 0
    for visitor in model.visitors:
        for probability in (0.0, 0.5, 1.0):
            key = f"campaign-{probability}"
            visit = reactions.respond_visit(visitor.visitor_id, PAYDAY_EVENING, 24.0, probability, key)
            assert visit == reactions.respond_visit(visitor.visitor_id, PAYDAY_EVENING, 24.0, probability, key)
            view, *purchase = visit
            assert view.type is EventType.PRODUCT_VIEW
            assert PAYDAY_EVENING <= view.timestamp <= PAYDAY_EVENING + timedelta(hours=24)
            assert len(purchase) <= 1
            if probability in (0.0, 1.0):
                assert len(purchase) == probability
            for event in purchase:
                assert event.type is EventType.PURCHASE and event.item_id == view.item_id
                assert event.timestamp > view.timestamp
            assert all(event.recommendation_id is None for event in visit)
            bought += probability == 0.5 and bool(purchase)
    assert 0.3 * len(model.visitors) < bought < 0.7 * len(model.visitors)


def test_answers_do_not_depend_on_the_order_they_are_asked_in(shop: DemoShop, model: VisitorModel) -> None:
    message = shop.messages[0]
    assert message.message is not None
    channel = message.message.channels[0]

    def ask(reactions: Reactions, visitor_id: str) -> list[Event]:
        shown = [ShownItem(item_id, position) for position, item_id in enumerate(_favourites(model, visitor_id, 6))]
        return [
            *reactions.respond(visitor_id, shown, PAYDAY_EVENING, "rec-1", "home"),
            *reactions.respond_message(visitor_id, message.item_id, None, channel, PAYDAY_EVENING, "msg-1"),
            *reactions.respond_visit(visitor_id, PAYDAY_EVENING, 48.0, 0.5, "visit-1"),
        ]

    visitor_ids = [visitor.visitor_id for visitor in model.visitors]
    forwards = {visitor_id: ask(Reactions(model), visitor_id) for visitor_id in visitor_ids}
    backwards = {visitor_id: ask(Reactions(model), visitor_id) for visitor_id in reversed(visitor_ids)}
    assert forwards == backwards
    assert sum(len(answer) for answer in forwards.values()) > len(visitor_ids)
