"""The next-best-message uplift model and its features, shared by serving, training (`train.py`) and offline
evaluation (`replay.py`, `ope.py`).

The model follows the funnel the events record. A message can only cause a purchase through its own
open -> click -> purchase chain (outcome events echo the decision's `recommendation_id`), so three LightGBM
classifiers learn P(open | sent), P(click | open) and P(purchase | click) from the sends, and a fourth
learns the baseline b(x) = P(any purchase in the outcome window | nothing sent) from the decisions that
sent nothing (the random control group, exploration and "no uplift" answers). A message-driven purchase
replaces a purchase the visitor would have made anyway with probability b(x), so the expected uplift of
message a is

    uplift(x, a) = P(open) * P(click | open) * P(purchase | click) * (1 - b(x)).

Chained models learn from the frequent events (opens are 10-30% of sends) instead of the rare purchase
difference between two noisy groups, which is what lets a few thousand sends rank messages. The control
group checks the model: training reports the measured incremental conversion (sent vs control) next to
the model's predicted mean uplift.

Direct uplift learning (`learner="uplift"`) needs no opens or clicks: a T-learner whose two LightGBM models
learn the chosen reward (`reward.py`: conversion, visit, capped revenue or a mix) of the decisions that sent a
message (on the decision and message columns) and of those that sent nothing (the random control group,
exploration; on the decision columns), each weighted by 1 / logged propensity so the logging policy's
preferences do not bias either arm. uplift(x, a) = mu_sent(x, a) - mu_nothing(x).

A decision's visitor row is VISITOR_COLUMNS followed by one column per declared customer trait
(`services/common/traits.py`, `decision_vector`). The model stores the trait schema it was trained with, so
serving builds exactly its columns (and category codes) whatever the settings declare today.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any, Final

import lightgbm as lgb
import numpy as np
import orjson

from services.common.catalog import MESSAGE_TRIGGERS
from services.common.context import is_payday_window, local_time, zone_for
from services.common.traits import TraitSchema
from services.features.item_cache import ItemSnapshot
from services.features.schema import CHANNEL_CODES, as_number
from services.messages.reward import Reward

DAY: Final = 86_400.0
TRIGGERS: Final = MESSAGE_TRIGGERS
TRIGGER_CODES: Final = {trigger: code for code, trigger in enumerate(TRIGGERS, start=1)}  # 0 = nothing sent

VISITOR_COLUMNS: Final[tuple[str, ...]] = (
    "v_days_since_seen",
    "v_days_since_purchase",
    "v_views_7d",
    "v_views_30d",
    "v_carts_7d",
    "v_purchases_30d",
    "v_orders",
    "v_session_depth",
    "v_discount_affinity",
    "v_price_sensitivity",
    "v_payday_share",
    "v_log_cart_value",
    "v_cart_items",
    "v_cart_age_h",
    "v_activity_at_send",
    "v_peak_activity",
    "v_views_per_order",
    "v_locale_en",
    "c_send_hour",
    "c_delay_h",
    "c_day_of_week",
    "c_is_payday_window",
    "c_channel_code",
)
ACTION_COLUMNS: Final[tuple[str, ...]] = (
    "a_trigger_code",
    "a_template_code",
    "a_has_product",
    "p_discount",
    "p_log_price",
    "p_price_ratio",
    "p_category_affinity",
    "p_in_cart",
    "p_recently_viewed",
    "p_age_days",
)
MESSAGE_FEATURES: Final = VISITOR_COLUMNS + ACTION_COLUMNS
CATEGORICAL: Final = ("c_channel_code", "a_trigger_code", "a_template_code")
STAGES: Final = ("open", "click", "purchase")
LEARNERS: Final = ("funnel", "uplift")
MODEL_FORMAT: Final = 1


def visitor_columns(traits: TraitSchema) -> tuple[str, ...]:
    """The columns of a decision row (`decision_vector`) for a trait schema."""
    return VISITOR_COLUMNS + traits.columns


def model_features(traits: TraitSchema) -> tuple[str, ...]:
    return visitor_columns(traits) + ACTION_COLUMNS


def categorical_columns(traits: TraitSchema) -> tuple[str, ...]:
    """LightGBM categoricals: codes, not quantities (trait categories use the schema's fixed code table)."""
    return CATEGORICAL + traits.categorical_columns


def template_code(template_id: str) -> int:
    """A stable small integer per template id (LightGBM categorical)."""
    return 1 + zlib.crc32(template_id.encode()) % 997


@dataclass(slots=True)
class VisitorView:
    """A visitor's row parsed once into what eligibility, rendering and the model need."""

    visitor_id: str
    known: bool
    row: Mapping[str, Any]
    zone: timezone
    locale: str
    cart: tuple[str, ...] = ()
    cart_updated: float = math.nan
    recent: tuple[str, ...] = ()
    purchased: frozenset[str] = frozenset()
    categories: tuple[str, ...] = ()
    affinity: Mapping[str, float] = field(default_factory=dict)
    last_seen: float = math.nan
    last_purchase: float = math.nan
    orders: int = 0
    histogram: tuple[float, ...] = ()
    persona_id: int = -1
    traits: Mapping[str, Any] = field(default_factory=dict)  # from `profile_update` events and customer imports

    @classmethod
    def from_row(
        cls, visitor_id: str, row: Mapping[str, Any] | None, traits: Mapping[str, Any] | None = None
    ) -> VisitorView:
        traits = traits or {}
        if not row or not row.get("event_count"):
            # A customer the shop told us about (CRM traits) is known even before any behaviour is recorded.
            city = traits.get("city")
            locale = str(traits.get("locale") or "id").split("-")[0].lower()
            zone = zone_for(city if isinstance(city, str) else None)
            return cls(visitor_id, bool(traits), row or {}, zone, locale, traits=traits)
        city = row.get("city") or None
        categories = tuple(row.get("top_categories") or ())
        persona = row.get("persona_id")
        return cls(
            visitor_id=visitor_id,
            known=True,
            row=row,
            zone=zone_for(city),
            locale=str(row.get("locale") or "id").split("-")[0].lower(),
            cart=tuple(row.get("cart_items") or ()),
            cart_updated=as_number(row.get("cart_updated_ts")),
            recent=tuple(row.get("recent_items") or ()),
            purchased=frozenset(row.get("purchased_items") or ()),
            categories=categories,
            affinity=dict(zip(categories, row.get("top_category_scores") or (), strict=False)),
            last_seen=as_number(row.get("last_seen_ts")),
            last_purchase=as_number(row.get("last_purchase_ts")),
            orders=int(row.get("rfm_frequency") or 0),
            histogram=tuple(row.get("hour_histogram") or ()),
            persona_id=int(persona) if isinstance(persona, int | float) and not math.isnan(persona) else -1,
            traits=traits,
        )

    def value(self, name: str) -> float:
        return as_number(self.row.get(name))


def visitor_vector(view: VisitorView, now: float, send_at: float, channel: str) -> list[float]:
    """VISITOR_COLUMNS for one decision (the same for every candidate message of it)."""
    local = local_time(send_at, view.zone)
    histogram = view.histogram
    views_30d = view.value("views_30d")
    cart_value = view.value("cart_value")
    return [
        (now - view.last_seen) / DAY,
        (now - view.last_purchase) / DAY,
        view.value("views_7d"),
        views_30d,
        view.value("carts_7d"),
        view.value("purchases_30d"),
        float(view.orders),
        view.value("session_depth"),
        view.value("discount_affinity"),
        view.value("price_sensitivity"),
        view.value("payday_purchase_share"),
        math.log1p(cart_value) if cart_value == cart_value and cart_value >= 0 else math.nan,
        float(len(view.cart)),
        (now - view.cart_updated) / 3600.0 if view.cart else math.nan,
        float(histogram[local.hour]) if len(histogram) == 24 else math.nan,
        float(max(histogram)) if len(histogram) == 24 else math.nan,
        views_30d / max(view.orders, 1) if views_30d == views_30d else math.nan,
        1.0 if view.locale == "en" else 0.0,
        float(local.hour),
        (send_at - now) / 3600.0,
        float(local.weekday()),
        float(is_payday_window(local.day)),
        float(CHANNEL_CODES.get(channel, 0)),
    ]


def decision_vector(view: VisitorView, now: float, send_at: float, channel: str, traits: TraitSchema) -> list[float]:
    """A decision's model row: VISITOR_COLUMNS then the declared traits (`traits.columns`) at decision time."""
    return [*visitor_vector(view, now, send_at, channel), *traits.vector(view.traits, now)]


def action_vector(
    view: VisitorView, trigger: str, template_id: str, product: int, snapshot: ItemSnapshot, now: float
) -> list[float]:
    """ACTION_COLUMNS for one candidate message (template + product; product -1 = none)."""
    head = [float(TRIGGER_CODES.get(trigger, 0)), float(template_code(template_id))]
    if product < 0:
        return [*head, 0.0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan]
    item_id = snapshot.ids[product]
    price = float(snapshot.price[product])
    typical = view.value("typical_price_viewed")
    category = snapshot.categories[product] or ""
    recent_rank = view.recent.index(item_id) if item_id in view.recent else -1
    return [
        *head,
        1.0,
        float(snapshot.discount[product]),
        math.log1p(price) if price == price else math.nan,
        price / typical if typical == typical and typical > 0 and price == price else math.nan,
        float(view.affinity.get(category, 0.0)),
        1.0 if item_id in view.cart else 0.0,
        1.0 / (1 + recent_rank) if recent_rank >= 0 else 0.0,
        (now - float(snapshot.created_ts[product])) / DAY,
    ]


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One classifier of the funnel, or a constant rate when there was too little data to learn more."""

    booster: lgb.Booster | None
    constant: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros(0)
        if self.booster is None:
            return np.full(len(X), self.constant)
        return np.asarray(self.booster.predict(X, num_threads=1), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        if self.booster is None:
            return {"constant": self.constant}
        return {"model": self.booster.model_to_string(), "constant": self.constant}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage:
        text = data.get("model")
        return cls(lgb.Booster(model_str=text) if text else None, float(data.get("constant", 0.0)))


class IncompatibleMessageModel(ValueError):
    """The stored model was trained on other features than this code builds."""


@dataclass
class MessageModel:
    version: str
    created_at: float
    stages: dict[str, Stage]  # open, click, purchase (on `features`) and baseline (on `visitor_columns`)
    window_h: float
    metrics: dict[str, Any] = field(default_factory=dict)
    traits: TraitSchema = field(default_factory=TraitSchema)  # the trait columns it was trained on
    # "funnel": open/click/purchase stages + baseline; "uplift": treated (mu_sent) + baseline (mu_nothing).
    learner: str = "funnel"
    reward: Reward = field(default_factory=Reward)  # what "uplift" is measured in

    @property
    def visitor_columns(self) -> tuple[str, ...]:
        return visitor_columns(self.traits)

    @property
    def features(self) -> tuple[str, ...]:
        return model_features(self.traits)

    def uplift(self, V: np.ndarray, A: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per candidate row: (uplift, P(message-driven purchase)); per decision row of V: baseline b(x).

        `V` holds one row per decision, `A` one row per candidate, `owner[j]` the decision of candidate j."""
        baseline = self.stages["baseline"].predict(V)
        if self.learner == "funnel" or self.reward.binary:
            baseline = np.clip(baseline, 0.0, 1.0)
        if len(A) == 0:
            return np.zeros(0), np.zeros(0), baseline
        X = np.hstack([V[owner], A])
        if self.learner == "uplift":
            treated = self.stages["treated"].predict(X)
            if self.reward.binary:
                treated = np.clip(treated, 0.0, 1.0)
            uplift = treated - baseline[owner]
            return uplift, np.maximum(uplift, 0.0), baseline
        attributed = (
            self.stages["open"].predict(X) * self.stages["click"].predict(X) * self.stages["purchase"].predict(X)
        )
        attributed = np.clip(attributed, 0.0, 1.0)
        return attributed * (1.0 - baseline[owner]), attributed, baseline

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "format": MODEL_FORMAT,
                "version": self.version,
                "created_at": self.created_at,
                "features": list(self.features),
                "traits": self.traits.model_dump(mode="json"),
                "learner": self.learner,
                "reward": self.reward.to_dict(),
                "window_h": self.window_h,
                "metrics": self.metrics,
                "stages": {name: stage.to_dict() for name, stage in self.stages.items()},
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> MessageModel:
        data = orjson.loads(raw)
        traits = TraitSchema.model_validate(data.get("traits") or {})
        if data.get("format") != MODEL_FORMAT or tuple(data.get("features", ())) != model_features(traits):
            raise IncompatibleMessageModel(f"message model {data.get('version')} was trained on other features")
        return cls(
            version=str(data["version"]),
            created_at=float(data["created_at"]),
            stages={name: Stage.from_dict(stage) for name, stage in data["stages"].items()},
            window_h=float(data.get("window_h", 24.0)),
            metrics=dict(data.get("metrics", {})),
            traits=traits,
            learner=str(data.get("learner", "funnel")),
            reward=Reward.from_dict(data.get("reward")),
        )
