"""Rule-based segments: lifecycle, RFM value tier, buyer-journey stage, price sensitivity, customer flag.

Each rule is driven through `fold_visitor` with real events (as the aggregator does), evaluated at chosen
moments, and the thresholds are shown to be configurable. The last tests check that segments reach Feast."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest

from services.features import schema as F
from services.features.aggregations import (
    DAY,
    ItemInfo,
    SegmentRules,
    VisitorState,
    fold_visitor,
    segments,
    visitor_features,
)
from services.features.store import online_rows
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from tests.factories import BASE_TIME, make_event, make_item

T0 = BASE_TIME.timestamp()
RULES = SegmentRules()
CATALOG = {
    "shirt": ItemInfo("fashion-pria", "Erigo", 150_000.0, 0.0),
    "dress": ItemInfo("fashion-wanita", "Cottonink", 300_000.0, 0.0),
    "promo": ItemInfo("makanan-ringan", "Chitato", 20_000.0, 0.3),
    "promo2": ItemInfo("kebutuhan-dapur", "Bimoli", 40_000.0, 0.25),
    "phone": ItemInfo("handphone", "Samsung", 4_000_000.0, 0.0),
    "laptop": ItemInfo("laptop", "Asus", 9_000_000.0, 0.0),
    "soap": ItemInfo("perawatan-kulit", "Wardah", 60_000.0, 0.0),
}

Step = tuple[float, str, str | None, dict[str, Any]]  # (days after T0, type, item, extra fields)


def visitor(steps: Sequence[Step]) -> VisitorState:
    """Fold events at T0 + days; consecutive events keep one session unless far apart."""
    state = VisitorState("v")
    for days, kind, item, extra in steps:
        ts = BASE_TIME + timedelta(days=days)
        fields: dict[str, Any] = {"visitor_id": "v", "type": kind, "timestamp": ts.isoformat(), "item_id": item}
        if item is None:
            fields["item_id"] = None
        if kind == "search":
            fields["query"] = "kaos"
        fields["context"] = {"device": "mobile", "city": "Jakarta", "session_id": f"s{int(days)}"}
        fields.update(extra)
        if "price" not in fields:
            fields["price"] = CATALOG[item].price if item else None
        assert fold_visitor(state, make_event(**fields), CATALOG.get(item or ""))
    return state


def view(days: float, item: str = "shirt") -> Step:
    return (days, "product_view", item, {})


def buy(days: float, item: str = "shirt", price: float | None = None, quantity: int = 1) -> Step:
    extra: dict[str, Any] = {"quantity": quantity}
    if price is not None:
        extra["price"] = price
    return (days, "purchase", item, extra)


def cart(days: float, item: str = "shirt") -> Step:
    return (days, "add_to_cart", item, {})


def at(state: VisitorState, days_after_last: float, rules: SegmentRules = RULES) -> dict[str, Any]:
    return segments(state, state.last_seen + days_after_last * DAY, rules)


# ------------------------------------------------------------------------------------------------ lifecycle


def test_lifecycle_new_active_at_risk_dormant_by_recency_and_age() -> None:
    newcomer = visitor([view(0), view(2)])
    assert at(newcomer, 0)["lifecycle"] == "new"  # first seen 2 days ago (<= 7)
    assert at(newcomer, 6)["lifecycle"] == "active"  # 8 days old, seen 6 days ago (< 14)
    regular = visitor([view(0), view(20)])
    assert at(regular, 0)["lifecycle"] == "active"
    assert at(regular, 13.9)["lifecycle"] == "active"
    assert at(regular, 30)["lifecycle"] == "at_risk"  # >= 30 days without a visit
    assert at(regular, 59.9)["lifecycle"] == "at_risk"
    assert at(regular, 60)["lifecycle"] == "dormant"  # >= 60 days


def test_loyal_needs_repeat_orders_and_recent_visits() -> None:
    # Three checkouts on different days: a repeat customer.
    loyal = visitor([view(0), buy(0.01), view(5), buy(5.01), view(10), buy(10.01)])
    assert loyal.orders == 3
    assert at(loyal, 1)["lifecycle"] == "loyal"
    # Loyal means engaged now: away longer than the active window, a loyal customer is only "active" ...
    assert at(loyal, 20)["lifecycle"] == "active"
    # ... and then at risk like everyone else (the most valuable visitors to win back).
    assert at(loyal, 31)["lifecycle"] == "at_risk"
    # Lines of one checkout (minutes apart) are one order, not three.
    basket = visitor([view(0), buy(0.01, "shirt"), buy(0.011, "dress"), buy(0.012, "soap")])
    assert basket.orders == 1
    assert at(basket, 1)["lifecycle"] == "new"


def test_lifecycle_thresholds_are_configurable() -> None:
    rules = SegmentRules(
        new_within_days=1, active_within_days=3, at_risk_after_days=5, dormant_after_days=10, loyal_min_purchases=1
    )
    state = visitor([view(0), view(2)])
    assert at(state, 0, rules)["lifecycle"] == "active"  # 2 days old > 1
    assert at(state, 5, rules)["lifecycle"] == "at_risk"
    assert at(state, 10, rules)["lifecycle"] == "dormant"
    buyer = visitor([view(0), buy(0.01)])
    assert at(buyer, 0.5, rules)["lifecycle"] == "loyal"  # one order is enough with loyal_min_purchases=1
    assert at(buyer, 4, rules)["lifecycle"] == "active"  # outside the 3-day active window
    assert at(buyer, 4)["lifecycle"] == "new"  # default rules: 4 days old


# ------------------------------------------------------------------------------------------------ RFM value


@pytest.mark.parametrize(
    ("lines", "tier"),
    [
        ([], "none"),
        ([(199_000.0, 1)], "low"),
        ([(250_000.0, 2)], "mid"),  # exactly 500,000: the mid tier starts at the threshold
        ([(1_000_000.0, 1), (1_999_000.0, 1)], "mid"),
        ([(1_000_000.0, 3)], "high"),
    ],
)
def test_value_tier_from_lifetime_spend(lines: list[tuple[float, int]], tier: str) -> None:
    steps: list[Step] = [view(0)]
    for n, (price, quantity) in enumerate(lines):
        steps.append(buy(1 + n, price=price, quantity=quantity))
    state = visitor(steps)
    assert at(state, 0)["value_tier"] == tier
    assert at(state, 0)["is_customer"] == int(bool(lines))


def test_value_tier_thresholds_are_configurable() -> None:
    state = visitor([view(0), buy(1, price=100_000.0)])
    assert at(state, 0)["value_tier"] == "low"
    assert at(state, 0, SegmentRules(value_tiers_idr=(50_000.0, 90_000.0)))["value_tier"] == "high"
    assert at(state, 0, SegmentRules(value_tiers_idr=(50_000.0, 200_000.0)))["value_tier"] == "mid"


# ------------------------------------------------------------------------------------------------ journey


def test_journey_awareness_when_browsing_broadly() -> None:
    broad = visitor(
        [view(0, "shirt"), view(0.01, "phone"), view(0.02, "promo"), view(0.03, "soap"), view(0.04, "laptop")]
    )
    assert at(broad, 0)["journey_stage"] == "awareness"


def test_journey_consideration_when_comparing_within_a_category_or_carting() -> None:
    comparing = visitor([view(0, "phone"), view(0.01, "phone"), view(0.02, "laptop"), view(0.03, "phone")])
    # Three of four views in phones plus one laptop: focused (top category >= half) but only 4 views.
    assert at(comparing, 0)["journey_stage"] == "consideration"
    few = visitor([view(0, "phone"), view(0.01, "phone")])
    assert at(few, 0)["journey_stage"] == "awareness"  # two views are not yet comparing
    carted = visitor([view(0), cart(0.01)])
    assert at(carted, 2)["journey_stage"] == "consideration"  # a cart left for two days: still considering
    assert at(carted, 20)["journey_stage"] == "consideration"  # items stay in the cart


def test_journey_decision_is_checkout_behaviour() -> None:
    carting_now = visitor([view(0), cart(0.01)])
    assert at(carting_now, 0.1)["journey_stage"] == "decision"  # cart filled in the last day: at the checkout
    bought = visitor([view(0), cart(0.01), buy(0.02)])
    assert not bought.cart
    assert at(bought, 1)["journey_stage"] == "decision"  # checked out within the week
    assert at(bought, 8)["journey_stage"] == "awareness"  # a week later the journey starts again


# ------------------------------------------------------------------------------------------------ price


def test_price_sensitivity_from_discount_appetite_and_paying_below_browsing() -> None:
    full_price = visitor([view(0.01 * i, "phone") for i in range(6)])
    assert at(full_price, 0)["price_sensitivity"] == 0.0
    hunter = visitor([view(0.01 * i, "promo" if i % 2 else "promo2") for i in range(12)])
    assert at(hunter, 0)["price_sensitivity"] > 0.7
    # Browses phones and laptops, buys the cheap accessory: pays far below what they look at.
    trader_down = visitor([*[view(0.01 * i, "laptop") for i in range(6)], buy(0.1, "soap")])
    assert at(trader_down, 0)["price_sensitivity"] > 0.9
    assert 0.0 <= at(trader_down, 0)["price_sensitivity"] <= 1.0


def test_customer_flag_is_set_by_the_first_order() -> None:
    prospect = visitor([view(0), cart(0.1)])
    assert at(prospect, 0)["is_customer"] == 0
    customer = visitor([view(0), cart(0.1), buy(0.2)])
    assert at(customer, 0)["is_customer"] == 1


# ------------------------------------------------------------------------------------------------ Feast


def test_segments_are_written_to_feast_in_real_time(settings_factory: Callable[..., Any]) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings)
    repository = ProfileRepository.open(settings)
    try:
        repository.upsert_catalog([make_item(item_id="seg-item", price=1_000_000)])
        aggregator = Aggregator(repository, RULES, settings.consent_defaults())
        ingest = IngestService(repository)
        ts = BASE_TIME
        ingest.ingest([make_event(visitor_id="seg-v", item_id="seg-item", timestamp=ts.isoformat())])
        aggregator.run_once(100)
        row = online_rows(repository.feature_store, F.VISITOR_VIEW, ["seg-v"])[0]
        assert (row["lifecycle"], row["journey_stage"], row["is_customer"], row["value_tier"]) == (
            "new",
            "awareness",
            0,
            "none",
        )
        later = (ts + timedelta(minutes=5)).isoformat()
        ingest.ingest(
            [
                make_event(visitor_id="seg-v", type="add_to_cart", item_id="seg-item", timestamp=later),
                make_event(visitor_id="seg-v", type="purchase", item_id="seg-item", price=4_000_000, timestamp=later),
            ]
        )
        aggregator.run_once(100)
        row = online_rows(repository.feature_store, F.VISITOR_VIEW, ["seg-v"])[0]
        assert (row["journey_stage"], row["is_customer"], row["value_tier"]) == ("decision", 1, "high")
    finally:
        repository.close()


def test_every_service_reads_the_same_configured_segment_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thresholds are shared settings: message replay and training (recommend settings) segment visitors
    exactly like the profile service (before, they used the defaults whatever the shop configured)."""
    from services.common.settings import CommonSettings
    from services.profile.settings import ProfileSettings
    from services.recommend.settings import RecommendSettings

    monkeypatch.setenv("PROFILE_AT_RISK_AFTER_DAYS", "21")  # the profile-only name of earlier versions
    monkeypatch.setenv("SELARAS_VALUE_TIER_HIGH_IDR", "2000000")
    rules = [SegmentRules.from_settings(kind()) for kind in (CommonSettings, ProfileSettings, RecommendSettings)]
    assert rules[0] == rules[1] == rules[2]
    assert rules[0].at_risk_after_days == 21 and rules[0].value_tiers_idr == (500_000.0, 2_000_000.0)
    assert rules[0] != SegmentRules()


def test_segment_names_are_the_keys_segments_returns() -> None:
    """Persona movement compares a visitor's segments by SEGMENT_NAMES: it must name every segment column."""
    from services.features.aggregations import SEGMENT_NAMES

    assert tuple(segments(VisitorState("v"), 0.0, SegmentRules())) == SEGMENT_NAMES


def test_online_rows_equal_the_features_of_the_stored_state(settings_factory: Callable[..., Any]) -> None:
    """The aggregator writes a visitor's online row from the batch's newest history row when that row was taken
    at the visitor's latest event, and computes it afresh otherwise (an older event folded last, an impression
    after the last visit). Either way the row online is the stored state's features at its last visit."""
    settings: ProfileSettings = settings_factory(ProfileSettings)
    repository = ProfileRepository.open(settings)
    try:
        repository.upsert_catalog([make_item(item_id="on-a", price=200_000), make_item(item_id="on-b")])
        aggregator = Aggregator(repository, RULES, settings.consent_defaults())
        ts = BASE_TIME

        def at(seconds: float) -> str:
            return (ts + timedelta(seconds=seconds)).isoformat()

        events = [
            # in order: the last history row is the online row
            make_event(visitor_id="on-1", item_id="on-a", timestamp=at(0)),
            make_event(visitor_id="on-1", type="add_to_cart", item_id="on-a", timestamp=at(30)),
            # an older event folded last: its history row is not the state at the latest visit
            make_event(visitor_id="on-2", item_id="on-a", timestamp=at(100)),
            make_event(visitor_id="on-2", item_id="on-b", timestamp=at(-2 * DAY)),
            # an impression after the last visit: it does not move the last visit
            make_event(visitor_id="on-3", item_id="on-b", timestamp=at(10)),
            make_event(visitor_id="on-3", type="impression", item_id="on-a", timestamp=at(7200)),
            # two events at one moment
            make_event(visitor_id="on-4", item_id="on-a", timestamp=at(5)),
            make_event(visitor_id="on-4", type="purchase", item_id="on-b", timestamp=at(5)),
        ]
        IngestService(repository).ingest(events)
        aggregator.run_once(100)
        visitors = ["on-1", "on-2", "on-3", "on-4"]
        states = repository.visitor_states(visitors)
        online = online_rows(repository.feature_store, F.VISITOR_VIEW, visitors)
        for visitor_id, row in zip(visitors, online, strict=True):
            state = states[visitor_id]
            expected = visitor_features(state, RULES, state.last_seen)
            assert {name: row[name] for name in expected} == expected, visitor_id
        assert states["on-2"].last_seen == BASE_TIME.timestamp() + 100
        assert online[1]["views_1h"] == 1 and online[1]["views_7d"] == 2, "as of the latest visit, not the last event"
        assert online[2]["rec_impressions_7d"] == 1 and online[2]["views_1h"] == 1
    finally:
        repository.close()
