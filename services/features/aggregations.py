"""Pure aggregation code: fold events into visitor and item state, and turn state into feature rows.

No I/O here. The aggregator (service.py) feeds events in log order; imports feed them in file order; tests
feed them directly. The same functions run everywhere, so live and imported features agree.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from services.common.context import is_payday_window, local_hour, local_time, zone_for
from services.common.events import Event, EventType
from services.common.settings import CommonSettings
from services.features.indexes import ContextPopularity, CoVisitation, context_keys, observe_interaction, push_recent

HOUR = 3600.0
DAY = 24 * HOUR
SESSION_GAP_S = 30 * 60
MAX_TIMESTAMPS = 2000  # per visitor and event type within 30 days: bounds a state's size
AFFINITY_HALF_LIFE_S = 14 * DAY
HOUR_HISTOGRAM_HALF_LIFE_S = 30 * DAY
PRICE_EWM_ALPHA = 0.15
DISCOUNT_THRESHOLD = 0.1
TOP_K = 8
BEHAVIOUR_TYPES = frozenset(
    {
        EventType.PAGE_VIEW,
        EventType.PRODUCT_VIEW,
        EventType.SEARCH,
        EventType.ADD_TO_CART,
        EventType.REMOVE_FROM_CART,
        EventType.PURCHASE,
        EventType.CLICK,
        EventType.DISMISS,
        EventType.IMPRESSION,
    }
)
AFFINITY_WEIGHTS = {
    EventType.PRODUCT_VIEW: 1.0,
    EventType.CLICK: 1.5,
    EventType.ADD_TO_CART: 3.0,
    EventType.PURCHASE: 5.0,
    EventType.DISMISS: -0.5,
}


@dataclass(frozen=True)
class ItemInfo:
    """What aggregation needs to know of a catalog item."""

    category: str | None
    brand: str | None
    price: float | None
    discount: float


@dataclass(frozen=True)
class SegmentRules:
    """Thresholds for the rule-based segments (configurable per shop).

    Lifecycle, first match wins: dormant (no visit for dormant_after_days), at_risk (at_risk_after_days),
    loyal (loyal_min_purchases orders and a visit within active_within_days), new (first seen within
    new_within_days), else active."""

    active_within_days: float = 14.0
    at_risk_after_days: float = 30.0
    dormant_after_days: float = 60.0
    new_within_days: float = 7.0
    loyal_min_purchases: int = 3
    value_tiers_idr: tuple[float, float] = (500_000.0, 3_000_000.0)  # low < t0 <= mid < t1 <= high

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> SegmentRules:
        """The shop's configured rules: every path that segments visitors (the aggregator, message replay,
        training, evaluation, audiences) must use these, not the defaults."""
        return cls(
            active_within_days=settings.active_within_days,
            at_risk_after_days=settings.at_risk_after_days,
            dormant_after_days=settings.dormant_after_days,
            new_within_days=settings.new_within_days,
            loyal_min_purchases=settings.loyal_min_purchases,
            value_tiers_idr=(settings.value_tier_mid_idr, settings.value_tier_high_idr),
        )


def _prune(timestamps: list[float], now: float, horizon: float = 30 * DAY) -> None:
    cut = bisect.bisect_left(timestamps, now - horizon)
    if cut:
        del timestamps[:cut]
    if len(timestamps) > MAX_TIMESTAMPS:
        del timestamps[: len(timestamps) - MAX_TIMESTAMPS]


def _insert(timestamps: list[float], ts: float) -> None:
    # Events mostly arrive in order; insort keeps the list sorted when they do not.
    if not timestamps or ts >= timestamps[-1]:
        timestamps.append(ts)
    else:
        bisect.insort(timestamps, ts)


def count_since(timestamps: list[float], since: float) -> int:
    return len(timestamps) - bisect.bisect_left(timestamps, since)


def _decay(score: float, elapsed: float, half_life: float) -> float:
    return score * math.pow(0.5, max(elapsed, 0.0) / half_life)


def _bump(affinities: dict[str, list[float]], key: str, weight: float, ts: float) -> None:
    """Decayed affinity: entries are [score, last_update_ts]; keeps the 3×TOP_K strongest."""
    score, last = affinities.get(key, (0.0, ts))
    affinities[key] = [max(_decay(score, ts - last, AFFINITY_HALF_LIFE_S) + weight, 0.0), ts]
    if len(affinities) > 3 * TOP_K:
        weakest = min(affinities, key=lambda k: _decay(affinities[k][0], ts - affinities[k][1], AFFINITY_HALF_LIFE_S))
        del affinities[weakest]


def top_affinities(affinities: Mapping[str, list[float]], now: float) -> tuple[list[str], list[float]]:
    if not affinities:
        return [], []
    rate = math.log(0.5) / AFFINITY_HALF_LIFE_S
    scored = [(k, s * math.exp(rate * max(now - t, 0.0))) for k, (s, t) in affinities.items()]
    scored = [(k, s) for k, s in scored if s > 1e-6]
    # Strongest first, ties by key: two C-level sorts (the second is stable) instead of a Python key tuple per
    # entry; this runs twice for every history row the aggregator writes.
    scored.sort(key=itemgetter(0))
    scored.sort(key=itemgetter(1), reverse=True)
    scored = scored[:TOP_K]
    total = sum(s for _, s in scored) or 1.0
    # Not rounded: round(x, 6) costs ~0.5 µs (a decimal conversion), and a history row has up to 40 such shares.
    return [k for k, _ in scored], [s / total for _, s in scored]


@dataclass
class VisitorState:
    visitor_id: str
    event_count: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    last_purchase: float = 0.0
    session_id: str = ""
    session_depth: int = 0
    views: list[float] = field(default_factory=list)
    carts: list[float] = field(default_factory=list)
    purchases: list[float] = field(default_factory=list)
    searches: list[float] = field(default_factory=list)
    session_starts: list[float] = field(default_factory=list)
    discount_views: list[float] = field(default_factory=list)
    rec_impressions: list[float] = field(default_factory=list)
    rec_clicks: list[float] = field(default_factory=list)
    log_price_viewed: float | None = None
    log_price_paid: float | None = None
    discount_affinity: float = 0.0
    cart: dict[str, list[float]] = field(default_factory=dict)  # item -> [quantity, unit price, added ts]
    cart_updated: float = 0.0
    categories: dict[str, list[float]] = field(default_factory=dict)
    brands: dict[str, list[float]] = field(default_factory=dict)
    recent_items: list[str] = field(default_factory=list)
    purchased_items: list[str] = field(default_factory=list)
    hour_histogram: list[float] = field(default_factory=lambda: [0.0] * 24)
    hour_histogram_ts: float = 0.0
    devices: dict[str, int] = field(default_factory=dict)
    channels: dict[str, int] = field(default_factory=dict)
    city: str = ""
    locale: str = ""
    utc_offset_min: int | None = None
    orders: int = 0
    monetary: float = 0.0
    payday_purchases: int = 0
    traits: dict[str, Any] = field(default_factory=dict)
    persona_id: int = -1
    # Log position of the last folded event: makes replays after a crash harmless.
    applied_position: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisitorState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def fold_visitor(state: VisitorState, event: Event, item: ItemInfo | None) -> bool:
    """Apply one event to the visitor's state. Returns False when the event changes no feature."""
    ts = event.ts
    kind = event.type
    if kind is EventType.PROFILE_UPDATE:
        for key, value in event.properties.items():
            if key.startswith("consent_"):
                continue  # consent lives in its own record, not among the traits
            state.traits[key] = value
        if isinstance(event.properties.get("city"), str):
            state.city = str(event.properties["city"])
        if isinstance(event.properties.get("locale"), str):
            state.locale = str(event.properties["locale"])
        return True
    if kind is EventType.IMPRESSION:
        # Being shown something is not a visit: it only counts towards the recommendation CTR.
        _insert(state.rec_impressions, ts)
        _prune(state.rec_impressions, max(state.last_seen, ts))
        return True
    if kind not in BEHAVIOUR_TYPES and kind not in (EventType.MESSAGE_OPEN, EventType.MESSAGE_CLICK):
        return False

    state.event_count += 1
    if not state.first_seen or ts < state.first_seen:
        state.first_seen = ts
    ctx = event.context
    if ctx.city:
        state.city = ctx.city
    if ctx.locale:
        state.locale = ctx.locale
    offset = event.timestamp.utcoffset()
    if offset is not None:
        state.utc_offset_min = int(offset.total_seconds() // 60)

    # Sessions: a client session id wins; otherwise 30 minutes of silence start a new session.
    new_session = (ctx.session_id and ctx.session_id != state.session_id) or (
        not ctx.session_id and ts - state.last_seen > SESSION_GAP_S
    )
    if new_session:
        state.session_id = ctx.session_id or f"t{int(ts)}"
        state.session_depth = 0
        _insert(state.session_starts, ts)
    state.session_depth += 1
    state.last_seen = max(state.last_seen, ts)

    if kind is EventType.CLICK and event.recommendation_id:
        _insert(state.rec_clicks, ts)

    if kind not in (EventType.MESSAGE_OPEN, EventType.MESSAGE_CLICK):
        _observe_activity(state, event, ts)

    weight = AFFINITY_WEIGHTS.get(kind)
    if weight is not None and item is not None:
        if item.category:
            _bump(state.categories, item.category, weight, ts)
        if item.brand:
            _bump(state.brands, item.brand, weight, ts)

    price = event.price if event.price is not None else (item.price if item else None)
    discount = item.discount if item else 0.0
    item_id = event.item_id
    if kind in (EventType.PRODUCT_VIEW, EventType.CLICK) and item_id:
        if kind is EventType.PRODUCT_VIEW:
            _insert(state.views, ts)
            if discount >= DISCOUNT_THRESHOLD:
                _insert(state.discount_views, ts)
        if price:
            state.log_price_viewed = _ewm(state.log_price_viewed, math.log(price))
        state.discount_affinity = (1 - PRICE_EWM_ALPHA) * state.discount_affinity + PRICE_EWM_ALPHA * float(
            discount >= DISCOUNT_THRESHOLD
        )
        push_recent(state.recent_items, item_id)
    elif kind is EventType.SEARCH:
        _insert(state.searches, ts)
    elif kind is EventType.ADD_TO_CART and item_id:
        _insert(state.carts, ts)
        quantity, _, _ = state.cart.get(item_id, (0.0, 0.0, ts))
        state.cart[item_id] = [quantity + (event.quantity or 1), float(price or 0.0), ts]
        state.cart_updated = ts
        push_recent(state.recent_items, item_id)
    elif kind is EventType.REMOVE_FROM_CART and item_id:
        if item_id in state.cart:
            remaining = state.cart[item_id][0] - (event.quantity or state.cart[item_id][0])
            if remaining <= 0:
                del state.cart[item_id]
            else:
                state.cart[item_id][0] = remaining
        state.cart_updated = ts
    elif kind is EventType.PURCHASE and item_id:
        _insert(state.purchases, ts)
        if ts - state.last_purchase > SESSION_GAP_S:
            state.orders += 1  # purchase lines of one checkout count as one order
            if is_payday_window(local_time(ts, zone_for(state.city, state.utc_offset_min)).day):
                state.payday_purchases += 1
        state.last_purchase = max(state.last_purchase, ts)
        state.monetary += float(price or 0.0) * (event.quantity or 1)
        if price:
            state.log_price_paid = _ewm(state.log_price_paid, math.log(price))
        state.cart.pop(item_id, None)
        state.cart_updated = ts
        push_recent(state.purchased_items, item_id)
        # A purchase is the strongest interaction: shops that export only orders have no other sequence.
        push_recent(state.recent_items, item_id)
    for timestamps in (
        state.views,
        state.carts,
        state.purchases,
        state.searches,
        state.session_starts,
        state.discount_views,
        state.rec_impressions,
        state.rec_clicks,
    ):
        _prune(timestamps, state.last_seen)
    return True


def fold_indexes(
    covisitation: CoVisitation,
    popularity: ContextPopularity,
    event: Event,
    state: VisitorState,
    previous_items: Sequence[str],
) -> None:
    """The candidate indexes' share of an event, after `fold_visitor` (`previous_items`: the visitor's recent
    items before the event). The aggregator and the in-process bulk fold both call this."""
    keys = context_keys(event.ts, state.city, event.context.device, state.utc_offset_min)
    observe_interaction(covisitation, popularity, event.type.value, event.item_id, previous_items, keys, event.ts)


def _ewm(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - PRICE_EWM_ALPHA) * previous + PRICE_EWM_ALPHA * value


def _observe_activity(state: VisitorState, event: Event, ts: float) -> None:
    hour = local_hour(ts, zone_for(state.city, state.utc_offset_min))
    factor = math.pow(0.5, max(ts - state.hour_histogram_ts, 0.0) / HOUR_HISTOGRAM_HALF_LIFE_S)
    if factor < 0.999:
        state.hour_histogram = [h * factor for h in state.hour_histogram]
    state.hour_histogram[hour] += 1.0
    state.hour_histogram_ts = max(state.hour_histogram_ts, ts)
    if event.context.device:
        state.devices[event.context.device.value] = state.devices.get(event.context.device.value, 0) + 1
    if event.context.channel:
        state.channels[event.context.channel] = state.channels.get(event.context.channel, 0) + 1


# The keys `segments` returns (the visitor row's segment columns).
SEGMENT_NAMES = ("lifecycle", "value_tier", "journey_stage", "price_sensitivity", "is_customer")


def segments(
    state: VisitorState, now: float, rules: SegmentRules, category_scores: list[float] | None = None
) -> dict[str, Any]:
    """Lifecycle, value tier, buyer-journey stage, price sensitivity and customer flag."""
    days_since_seen = (now - state.last_seen) / DAY if state.last_seen else math.inf
    age_days = (now - state.first_seen) / DAY if state.first_seen else 0.0
    if days_since_seen >= rules.dormant_after_days:
        lifecycle = "dormant"
    elif days_since_seen >= rules.at_risk_after_days:
        lifecycle = "at_risk"
    elif state.orders >= rules.loyal_min_purchases and days_since_seen < rules.active_within_days:
        lifecycle = "loyal"  # a repeat buyer who is still around; away longer, they count as active"
    elif age_days <= rules.new_within_days:
        lifecycle = "new"
    else:
        lifecycle = "active"
    low, high = rules.value_tiers_idr
    value_tier = (
        "none" if state.monetary <= 0 else "low" if state.monetary < low else "mid" if state.monetary < high else "high"
    )

    recent_views = count_since(state.views, now - 7 * DAY)
    recent_carts = count_since(state.carts, now - 7 * DAY)
    if category_scores is None:
        _, category_scores = top_affinities(state.categories, now)
    focused = bool(category_scores) and category_scores[0] >= 0.5
    # Decision = checkout behaviour: bought this week, or filled the cart within the last day. An older cart
    # (abandoned or parked) means the visitor is still considering those items.
    if count_since(state.purchases, now - 7 * DAY) or (state.cart and now - state.cart_updated < DAY):
        journey = "decision"
    elif state.cart or recent_carts or (focused and recent_views >= 4):
        journey = "consideration"
    else:
        journey = "awareness"
    # Price sensitivity: discount appetite plus how far below the viewed price the visitor pays.
    sensitivity = state.discount_affinity
    if state.log_price_paid is not None and state.log_price_viewed is not None:
        sensitivity += max(0.0, min(1.0, (state.log_price_viewed - state.log_price_paid) / 2))
    return {
        "lifecycle": lifecycle,
        "value_tier": value_tier,
        "journey_stage": journey,
        "price_sensitivity": round(min(sensitivity, 1.0), 6),
        "is_customer": int(state.orders > 0),
    }


def visitor_features(state: VisitorState, rules: SegmentRules, now: float | None = None) -> dict[str, Any]:
    """The visitor's feature row as of `now` (default: its latest event)."""
    at = now if now is not None else state.last_seen
    categories, category_scores = top_affinities(state.categories, at)
    brands, brand_scores = top_affinities(state.brands, at)
    histogram_total = sum(state.hour_histogram)
    # Shares, not rounded (see `top_affinities`).
    histogram = [h / histogram_total for h in state.hour_histogram] if histogram_total else [0.0] * 24
    return {
        "views_1h": count_since(state.views, at - HOUR),
        "views_24h": count_since(state.views, at - DAY),
        "views_7d": count_since(state.views, at - 7 * DAY),
        "views_30d": count_since(state.views, at - 30 * DAY),
        "carts_24h": count_since(state.carts, at - DAY),
        "carts_7d": count_since(state.carts, at - 7 * DAY),
        "carts_30d": count_since(state.carts, at - 30 * DAY),
        "purchases_7d": count_since(state.purchases, at - 7 * DAY),
        "purchases_30d": count_since(state.purchases, at - 30 * DAY),
        "searches_24h": count_since(state.searches, at - DAY),
        "sessions_30d": count_since(state.session_starts, at - 30 * DAY),
        "discount_views_30d": count_since(state.discount_views, at - 30 * DAY),
        "rec_impressions_7d": count_since(state.rec_impressions, at - 7 * DAY),
        "rec_clicks_7d": count_since(state.rec_clicks, at - 7 * DAY),
        "event_count": state.event_count,
        "first_seen_ts": state.first_seen or None,
        "last_seen_ts": state.last_seen or None,
        "last_purchase_ts": state.last_purchase or None,
        "session_depth": state.session_depth,
        "typical_price_viewed": math.exp(state.log_price_viewed) if state.log_price_viewed is not None else None,
        "typical_price_paid": math.exp(state.log_price_paid) if state.log_price_paid is not None else None,
        "discount_affinity": round(state.discount_affinity, 6),
        "cart_items": list(state.cart),
        "cart_value": sum(q * p for q, p, _ in state.cart.values()),
        "cart_updated_ts": state.cart_updated or None,
        "top_categories": categories,
        "top_category_scores": category_scores,
        "top_brands": brands,
        "top_brand_scores": brand_scores,
        "recent_items": list(state.recent_items),
        "purchased_items": list(state.purchased_items),
        "hour_histogram": histogram,
        "peak_hour": state.hour_histogram.index(max(state.hour_histogram)) if histogram_total else None,
        "payday_purchase_share": state.payday_purchases / state.orders if state.orders else 0.0,
        "preferred_device": max(state.devices, key=lambda d: state.devices[d]) if state.devices else "",
        "preferred_channel": max(state.channels, key=lambda c: state.channels[c]) if state.channels else "",
        "city": state.city,
        "locale": state.locale,
        "rfm_frequency": state.orders,
        "rfm_monetary": round(state.monetary, 2),
        **segments(state, at, rules, category_scores),
        "persona_id": state.persona_id,
    }


# ------------------------------------------------------------------------------------------------
# Items
# ------------------------------------------------------------------------------------------------

ITEM_COUNTERS = ("views", "carts", "purchases", "impressions", "clicks")
ITEM_COUNTER_OF = {
    EventType.PRODUCT_VIEW: "views",
    EventType.ADD_TO_CART: "carts",
    EventType.PURCHASE: "purchases",
    EventType.IMPRESSION: "impressions",
    EventType.CLICK: "clicks",
}
CTR_PRIOR_IMPRESSIONS = 20.0  # smoothing: an item needs some impressions before its CTR moves far
CTR_PRIOR = 0.05


@dataclass
class ItemState:
    """Hourly buckets over 30 days: exact enough for windows of 1h/24h/7d/30d, bounded in size."""

    item_id: str
    buckets: dict[str, dict[str, int]] = field(default_factory=dict)  # counter -> {hour index: count}
    slot_buckets: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # slot -> counter -> ...
    last_ts: float = 0.0
    # No longer written: which partition's batches a stored state holds is now its applied marker, kept
    # next to it by `Store.merge_many` (the aggregator merges batch shares). Read for states stored before.
    applied: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def copy(self) -> ItemState:
        """An independent copy: the aggregator folds a batch into copies and keeps them only once the batch's
        writes have succeeded, so a failed batch never leaves counts in its cache."""
        return ItemState(
            self.item_id,
            {counter: dict(hours) for counter, hours in self.buckets.items()},
            {slot: {c: dict(h) for c, h in per_slot.items()} for slot, per_slot in self.slot_buckets.items()},
            self.last_ts,
            dict(self.applied),
        )


def _hour_index(ts: float) -> int:
    return int(ts // HOUR)


def fold_item(state: ItemState, event: Event) -> bool:
    counter = ITEM_COUNTER_OF.get(event.type)
    if counter is None:
        return False
    if event.type is EventType.CLICK and not event.recommendation_id:
        return False  # a click means a click on something we showed
    ts = event.ts
    hour = str(_hour_index(ts))
    bucket = state.buckets.setdefault(counter, {})
    bucket[hour] = bucket.get(hour, 0) + (event.quantity or 1 if counter == "purchases" else 1)
    slot = event.properties.get("slot")
    if counter in ("impressions", "clicks") and isinstance(slot, str) and slot:
        slot_bucket = state.slot_buckets.setdefault(slot[:32], {}).setdefault(counter, {})
        slot_bucket[hour] = slot_bucket.get(hour, 0) + 1
    previous_hour = _hour_index(state.last_ts)
    state.last_ts = max(state.last_ts, ts)
    now_hour = _hour_index(state.last_ts)
    # Pruning drops hours older than 30 days before the newest event. Only a newer hour or an event already
    # that old can make a bucket stale (states are pruned whenever they are folded or merged), so the scan
    # of every bucket runs once per item and hour instead of once per event.
    if now_hour != previous_hour or int(hour) <= now_hour - 30 * 24:
        _prune_buckets(state.buckets, now_hour)
        for per_slot in state.slot_buckets.values():
            _prune_buckets(per_slot, now_hour)
    return True


def merge_item_state(stored: ItemState | None, delta: ItemState) -> ItemState:
    """Add a batch's item counts (folded by `fold_item` into an empty state) to the stored state. Equal to
    folding the batch's events into the stored state one by one: counts add up, and which hours are pruned
    depends only on the newest event time. Aggregators of different partitions add to one item this way."""
    state = stored.copy() if stored is not None else ItemState(delta.item_id)
    for counter, hours in delta.buckets.items():
        bucket = state.buckets.setdefault(counter, {})
        for hour, count in hours.items():
            bucket[hour] = bucket.get(hour, 0) + count
    for slot, per_slot in delta.slot_buckets.items():
        for counter, hours in per_slot.items():
            bucket = state.slot_buckets.setdefault(slot, {}).setdefault(counter, {})
            for hour, count in hours.items():
                bucket[hour] = bucket.get(hour, 0) + count
    state.last_ts = max(state.last_ts, delta.last_ts)
    _prune_buckets(state.buckets, _hour_index(state.last_ts))
    for per_slot in state.slot_buckets.values():
        _prune_buckets(per_slot, _hour_index(state.last_ts))
    return state


def _prune_buckets(buckets: dict[str, dict[str, int]], now_hour: int) -> None:
    oldest = now_hour - 30 * 24
    for counter, hours in buckets.items():
        stale = [h for h in hours if int(h) <= oldest]
        for h in stale:
            del hours[h]
        buckets[counter] = hours


def _window(hours: Mapping[str, int] | None, now_hour: int, span: int) -> int:
    if not hours:
        return 0
    return sum(c for h, c in hours.items() if now_hour - span < int(h) <= now_hour)


def smoothed_rate(
    successes: float, trials: float, prior: float = CTR_PRIOR, weight: float = CTR_PRIOR_IMPRESSIONS
) -> float:
    return (successes + prior * weight) / (trials + weight)


def item_features(state: ItemState, now: float | None = None) -> dict[str, Any]:
    now_hour = _hour_index(now if now is not None else state.last_ts)
    b = state.buckets
    views_24h = _window(b.get("views"), now_hour, 24)
    views_7d = _window(b.get("views"), now_hour, 24 * 7)
    impressions_7d = _window(b.get("impressions"), now_hour, 24 * 7)
    clicks_7d = _window(b.get("clicks"), now_hour, 24 * 7)
    purchases_7d = _window(b.get("purchases"), now_hour, 24 * 7)
    slots = sorted(state.slot_buckets)
    return {
        "views_1h": _window(b.get("views"), now_hour, 1),
        "views_24h": views_24h,
        "views_7d": views_7d,
        "carts_7d": _window(b.get("carts"), now_hour, 24 * 7),
        "purchases_7d": purchases_7d,
        "purchases_30d": _window(b.get("purchases"), now_hour, 24 * 30),
        "impressions_7d": impressions_7d,
        "clicks_7d": clicks_7d,
        "ctr_7d": round(smoothed_rate(clicks_7d, impressions_7d), 6),
        "conversion_7d": round(smoothed_rate(purchases_7d, views_7d, prior=0.02), 6),
        # >1 when the last day is busier than the week's daily average
        "trend_score": round((views_24h + 1.0) / (views_7d / 7.0 + 1.0), 6),
        "slot_names": slots,
        "slot_ctr_7d": [
            round(
                smoothed_rate(
                    _window(state.slot_buckets[s].get("clicks"), now_hour, 24 * 7),
                    _window(state.slot_buckets[s].get("impressions"), now_hour, 24 * 7),
                ),
                6,
            )
            for s in slots
        ],
    }
