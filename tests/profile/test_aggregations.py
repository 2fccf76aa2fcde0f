"""Pure aggregation: windows, affinities, cart, sessions, RFM and item statistics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.events import EventType
from services.features.aggregations import (
    DAY,
    HOUR,
    ItemInfo,
    ItemState,
    SegmentRules,
    VisitorState,
    fold_item,
    fold_visitor,
    item_features,
    visitor_features,
)
from tests.factories import make_event

START = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)  # 10:00 in Jakarta (WIB)
RULES = SegmentRules()
SHOES = ItemInfo("sepatu-olahraga", "Adidas", 900_000.0, 0.0)
LIPSTICK = ItemInfo("kecantikan", "Wardah", 45_000.0, 0.3)


def at(seconds: float) -> str:
    return (START + timedelta(seconds=seconds)).isoformat()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=40 * DAY, allow_nan=False), min_size=1, max_size=80))
def test_windowed_counts_equal_brute_force(offsets: list[float]) -> None:
    state = VisitorState("v")
    for offset in offsets:  # any order: late events are inserted in place
        fold_visitor(state, make_event(type="product_view", timestamp=at(offset), item_id="p1"), SHOES)
    row = visitor_features(state, RULES)
    now = max(offsets)
    for name, window in (("views_1h", HOUR), ("views_24h", DAY), ("views_7d", 7 * DAY), ("views_30d", 30 * DAY)):
        expected = sum(1 for o in offsets if now - window <= o <= now)
        assert row[name] == expected, name


def test_category_and_brand_affinity_follow_behaviour() -> None:
    state = VisitorState("v")
    for i in range(5):
        fold_visitor(state, make_event(timestamp=at(i * 60), item_id=f"s{i}"), SHOES)
    fold_visitor(state, make_event(timestamp=at(400), item_id="l1"), LIPSTICK)
    row = visitor_features(state, RULES)
    assert row["top_categories"][0] == "sepatu-olahraga"
    assert row["top_category_scores"][0] > row["top_category_scores"][1]
    assert abs(sum(row["top_category_scores"]) - 1.0) < 1e-6
    assert row["top_brands"][0] == "Adidas"
    assert row["recent_items"][:2] == ["l1", "s4"]


def test_cart_add_remove_and_purchase() -> None:
    state = VisitorState("v")
    fold_visitor(state, make_event(type="add_to_cart", timestamp=at(0), item_id="a", quantity=2, price=100.0), SHOES)
    fold_visitor(state, make_event(type="add_to_cart", timestamp=at(10), item_id="b", price=50.0), LIPSTICK)
    assert visitor_features(state, RULES)["cart_value"] == 250.0
    fold_visitor(state, make_event(type="remove_from_cart", timestamp=at(20), item_id="b"), LIPSTICK)
    fold_visitor(state, make_event(type="purchase", timestamp=at(30), item_id="a", quantity=2, price=100.0), SHOES)
    row = visitor_features(state, RULES)
    assert row["cart_items"] == [] and row["cart_value"] == 0.0
    assert row["purchases_7d"] == 1 and row["rfm_frequency"] == 1 and row["rfm_monetary"] == 200.0
    assert row["purchased_items"] == ["a"]
    assert row["is_customer"] == 1 and row["value_tier"] == "low"
    assert row["journey_stage"] == "decision"


def test_sessions_hours_and_device() -> None:
    state = VisitorState("v")
    for day in range(3):
        for minute in range(3):
            fold_visitor(
                state,
                make_event(timestamp=at(day * DAY + minute * 60), context={"device": "desktop", "city": "Jakarta"}),
                SHOES,
            )
    row = visitor_features(state, RULES)
    assert row["sessions_30d"] == 3 and row["session_depth"] == 3
    assert row["peak_hour"] == 10  # 03:00 UTC is 10:00 in Jakarta
    assert row["preferred_device"] == "desktop" and row["city"] == "Jakarta"


def test_impressions_are_not_visits() -> None:
    state = VisitorState("v")
    fold_visitor(state, make_event(timestamp=at(0)), SHOES)
    fold_visitor(state, make_event(type="impression", timestamp=at(DAY), recommendation_id="r1"), SHOES)
    row = visitor_features(state, RULES)
    assert row["rec_impressions_7d"] == 1
    assert row["event_count"] == 1 and row["sessions_30d"] == 1
    assert row["last_seen_ts"] == START.timestamp()


def test_discount_affinity_grows_with_discounted_views() -> None:
    plain, hunter = VisitorState("a"), VisitorState("b")
    for i in range(10):
        fold_visitor(plain, make_event(timestamp=at(i)), SHOES)
        fold_visitor(hunter, make_event(timestamp=at(i)), LIPSTICK)
    assert (
        visitor_features(hunter, RULES)["discount_affinity"] > 0.5 > visitor_features(plain, RULES)["discount_affinity"]
    )
    assert visitor_features(hunter, RULES)["discount_views_30d"] == 10


def test_lifecycle_segments() -> None:
    state = VisitorState("v")
    fold_visitor(state, make_event(timestamp=at(0)), SHOES)
    assert visitor_features(state, RULES, now=START.timestamp() + DAY)["lifecycle"] == "new"
    assert visitor_features(state, RULES, now=START.timestamp() + 10 * DAY)["lifecycle"] == "active"
    assert visitor_features(state, RULES, now=START.timestamp() + 40 * DAY)["lifecycle"] == "at_risk"
    assert visitor_features(state, RULES, now=START.timestamp() + 70 * DAY)["lifecycle"] == "dormant"


def test_item_statistics_windows_and_ctr() -> None:
    state = ItemState("p1")
    for i in range(30):
        fold_item(
            state,
            make_event(type="impression", timestamp=at(i * 60), recommendation_id="r", properties={"slot": "home"}),
        )
    for i in range(6):
        fold_item(
            state,
            make_event(type="click", timestamp=at(i * 60 + 5), recommendation_id="r", properties={"slot": "home"}),
        )
    fold_item(state, make_event(type="click", timestamp=at(100)))  # a click without a recommendation is not ours
    for i in range(4):
        fold_item(state, make_event(type="product_view", timestamp=at(i * 3600)))
    row = item_features(state)
    assert row["impressions_7d"] == 30 and row["clicks_7d"] == 6
    assert row["views_7d"] == 4 and row["views_1h"] == 1
    assert 0.05 < row["ctr_7d"] < 6 / 30
    assert row["slot_names"] == ["home"] and row["slot_ctr_7d"][0] == row["ctr_7d"]


def test_event_types_that_change_nothing() -> None:
    state = VisitorState("v")
    assert fold_visitor(state, make_event(type="message_sent", timestamp=at(0)), None) is False
    assert not fold_item(ItemState("p"), make_event(type="dismiss", timestamp=at(0)))
    assert EventType.MESSAGE_SENT.value == "message_sent"
