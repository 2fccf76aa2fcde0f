"""Feature names and types: the one list that the Feast repo, the profile writer, training and serving share.

Feast views are generated from these lists in `feature_repo/feature_definitions.py`, so a feature exists in
exactly one place. Kinds map to Feast types there: int -> Int64, float -> Float64, str -> String,
str_list -> Array(String), float_list -> Array(Float64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Literal

from services.common.context import CHANNEL_CODES, DEVICE_CODES  # noqa: F401  (codes of context columns)

FeatureKind = Literal["int", "float", "str", "str_list", "float_list"]

PROJECT: Final = "selaras"
VISITOR_ENTITY: Final = "visitor"
VISITOR_KEY: Final = "visitor_id"
ITEM_ENTITY: Final = "item"
ITEM_KEY: Final = "item_id"
VISITOR_VIEW: Final = "visitor_features"
ITEM_VIEW: Final = "item_stats"
CONTEXT_VIEW: Final = "context_features"
FEATURE_SERVICE: Final = "ranker_v1"
TIMESTAMP_FIELD: Final = "event_timestamp"

# Lists kept on a visitor row are capped so a row stays small (a Feast/Redis read is one hash).
TOP_K_AFFINITIES: Final = 8
RECENT_ITEMS: Final = 20

VISITOR_FEATURES: Final[dict[str, FeatureKind]] = {
    # windowed counts (as of the visitor's latest event)
    "views_1h": "int",
    "views_24h": "int",
    "views_7d": "int",
    "views_30d": "int",
    "carts_24h": "int",
    "carts_7d": "int",
    "carts_30d": "int",
    "purchases_7d": "int",
    "purchases_30d": "int",
    "searches_24h": "int",
    "sessions_30d": "int",
    "discount_views_30d": "int",
    "rec_impressions_7d": "int",
    "rec_clicks_7d": "int",
    "event_count": "int",
    # recency: absolute times, turned into "seconds since" against the request time
    "first_seen_ts": "float",
    "last_seen_ts": "float",
    "last_purchase_ts": "float",
    "session_depth": "int",
    # price and discount behaviour
    "typical_price_viewed": "float",
    "typical_price_paid": "float",
    "discount_affinity": "float",
    # cart
    "cart_items": "str_list",
    "cart_value": "float",
    "cart_updated_ts": "float",
    # affinities (decayed, normalised to sum 1 over the kept top-k)
    "top_categories": "str_list",
    "top_category_scores": "float_list",
    "top_brands": "str_list",
    "top_brand_scores": "float_list",
    "recent_items": "str_list",
    "purchased_items": "str_list",
    # when and how the visitor shops
    "hour_histogram": "float_list",
    "peak_hour": "int",
    "payday_purchase_share": "float",
    "preferred_device": "str",
    "preferred_channel": "str",
    "city": "str",
    "locale": "str",
    # RFM raw values
    "rfm_frequency": "int",
    "rfm_monetary": "float",
    # segments and persona
    "lifecycle": "str",
    "value_tier": "str",
    "journey_stage": "str",
    "price_sensitivity": "float",
    "is_customer": "int",
    "persona_id": "int",
}

ITEM_FEATURES: Final[dict[str, FeatureKind]] = {
    "views_1h": "int",
    "views_24h": "int",
    "views_7d": "int",
    "carts_7d": "int",
    "purchases_7d": "int",
    "purchases_30d": "int",
    "impressions_7d": "int",
    "clicks_7d": "int",
    "ctr_7d": "float",
    "conversion_7d": "float",
    "trend_score": "float",
    # click-through rate per recommendation slot (parallel lists, slot names are shop-defined)
    "slot_names": "str_list",
    "slot_ctr_7d": "float_list",
}

# Request context: inputs of the on-demand feature view and what it derives.
CONTEXT_INPUTS: Final[dict[str, FeatureKind]] = {
    "request_ts": "float",
    "request_utc_offset_min": "int",
    "request_device": "str",
    "request_channel": "str",
    "request_city": "str",
}
CONTEXT_FEATURES: Final[dict[str, FeatureKind]] = {
    "hour": "int",
    "day_of_week": "int",
    "is_weekend": "int",
    "is_payday_window": "int",
    "device_code": "int",
    "channel_code": "int",
}

# The ranker's input columns, in order. Visitor/item/context values come from the views above;
# "x_" columns are crosses computed per candidate at scoring time by the same code in training and serving.
RANKER_FEATURES: Final[tuple[str, ...]] = (
    # visitor
    "v_views_24h",
    "v_views_7d",
    "v_carts_7d",
    "v_purchases_30d",
    "v_session_depth",
    "v_secs_since_last_visit",
    "v_secs_since_last_purchase",
    "v_log_typical_price_viewed",
    "v_discount_affinity",
    "v_cart_value",
    "v_rfm_frequency",
    "v_rec_ctr_7d",
    "v_price_sensitivity",
    "v_persona_id",
    "v_lifecycle_code",
    "v_journey_code",
    # context
    "c_hour",
    "c_day_of_week",
    "c_is_weekend",
    "c_is_payday_window",
    "c_device_code",
    "c_channel_code",
    # item
    "i_log_price",
    "i_discount",
    "i_age_days",
    "i_low_stock",
    "i_views_24h",
    "i_views_7d",
    "i_carts_7d",
    "i_purchases_7d",
    "i_ctr_7d",
    "i_conversion_7d",
    "i_trend_score",
    "i_slot_ctr_7d",
    "i_category_code",
    "i_popularity",
    # visitor x item crosses
    "x_category_affinity",
    "x_brand_affinity",
    "x_price_ratio",
    "x_in_cart",
    "x_recently_viewed",
    "x_covisitation",
    "x_targeting_match",
    # what comes next after the visitor's last items (services/recommend/ranking/next_item.py)
    "x_covisitation_rank",
    "x_last_item_transition",
    "x_two_step",
    "x_shared_tags",
    "x_generator",
    # item embeddings of the serving model (services/recommend/ranking/item_embeddings.py): score from the last items,
    # its rank among the candidates, similarity to the very last item
    "x_embedding",
    "x_embedding_rank",
    "x_embedding_last",
)
PERSONAL_FEATURE_PREFIXES: Final = ("v_", "x_")
CATEGORICAL_FEATURES: Final = (
    "v_persona_id",
    "v_lifecycle_code",
    "v_journey_code",
    "c_device_code",
    "c_channel_code",
    "i_category_code",
    "x_generator",
)

LIFECYCLE_CODES: Final = {"new": 0, "active": 1, "loyal": 2, "at_risk": 3, "dormant": 4}
JOURNEY_CODES: Final = {"awareness": 0, "consideration": 1, "decision": 2}


def visitor_feature_refs() -> list[str]:
    """`view:feature` references for a visitor-row read."""
    return [f"{VISITOR_VIEW}:{name}" for name in VISITOR_FEATURES]


def item_feature_refs() -> list[str]:
    return [f"{ITEM_VIEW}:{name}" for name in ITEM_FEATURES]


_HOUR, _DAY = 3600.0, 86_400.0
# The span of each windowed visitor count. A row holds the counts as of the visitor's latest event.
VISITOR_WINDOWS: Final[dict[str, float]] = {
    "views_1h": _HOUR,
    "views_24h": _DAY,
    "carts_24h": _DAY,
    "searches_24h": _DAY,
    "views_7d": 7 * _DAY,
    "carts_7d": 7 * _DAY,
    "purchases_7d": 7 * _DAY,
    "rec_impressions_7d": 7 * _DAY,
    "rec_clicks_7d": 7 * _DAY,
    "views_30d": 30 * _DAY,
    "carts_30d": 30 * _DAY,
    "purchases_30d": 30 * _DAY,
    "sessions_30d": 30 * _DAY,
    "discount_views_30d": 30 * _DAY,
}


def visitor_row_at(row: dict[str, Any], now: float) -> dict[str, Any]:
    """The visitor's row with its windows seen from `now` instead of from the visitor's latest event: a count
    whose whole window has passed since then is 0 ("views in the last 7 days" of a visitor last seen a month
    ago). A window still open keeps its count, which is then an upper bound (the row holds no finer detail).
    Serving applies it at the request time and training at the query time, so both see the same."""
    last_seen = row.get("last_seen_ts")
    if not isinstance(last_seen, int | float) or last_seen != last_seen:
        return row
    idle = now - float(last_seen)
    if idle < _HOUR:
        return row  # nothing has expired yet: no copy on the hot path
    aged = dict(row)
    for name, span in VISITOR_WINDOWS.items():
        if idle >= span and aged.get(name):
            aged[name] = 0
    return aged


def default_value(kind: FeatureKind) -> object:
    """What a missing feature reads as: numbers NaN (LightGBM treats it as missing), strings empty."""
    if kind in ("int", "float"):
        return float("nan")
    if kind == "str":
        return ""
    return []


def as_number(value: Any) -> float:
    """A row's value as a float; None and anything float() refuses read as NaN (the model's "missing")."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def view_columns(view: str) -> tuple[str, Mapping[str, FeatureKind]]:
    """A feature view's entity key and feature columns (the visitor view, else the item view)."""
    return (VISITOR_KEY, VISITOR_FEATURES) if view == VISITOR_VIEW else (ITEM_KEY, ITEM_FEATURES)
