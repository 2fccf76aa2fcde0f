"""The next-best-message uplift model: features shared by serving, training and offline evaluation; the
model; the replay of logged decisions; training.

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

Visitor features at a decision are the visitor's row as of that moment. Training and offline evaluation
replay the events through the profile service's own pure aggregation code (`services.profile.aggregations`),
the same code that writes the online rows the service reads, so serving and training see the same values.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any, Final

import lightgbm as lgb
import numpy as np
import orjson

from services.common.catalog import MESSAGE_TRIGGERS, CatalogItem, ItemKind
from services.common.clock import wall_datetime, wall_time
from services.common.consent import Consent, ConsentDefaults, consent_changes_from_properties
from services.common.context import is_payday_window, local_time, zone_for
from services.common.events import Event, EventType
from services.common.features import CHANNEL_CODES, as_number
from services.recommend.catalog_cache import ItemSnapshot, build_snapshot

log = logging.getLogger(__name__)

DAY: Final = 86_400.0
TRIGGERS: Final = MESSAGE_TRIGGERS
TRIGGER_CODES: Final = {trigger: code for code, trigger in enumerate(TRIGGERS, start=1)}  # 0 = nothing sent
NONE_ACTION: Final = "none"

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
MODEL_FORMAT: Final = 1


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

    @classmethod
    def from_row(cls, visitor_id: str, row: Mapping[str, Any] | None) -> VisitorView:
        if not row or not row.get("event_count"):
            return cls(visitor_id, False, row or {}, zone_for(None), "id")
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
    stages: dict[str, Stage]  # open, click, purchase (on MESSAGE_FEATURES) and baseline (on VISITOR_COLUMNS)
    window_h: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def uplift(self, V: np.ndarray, A: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per candidate row: (uplift, P(message-driven purchase)); per decision row of V: baseline b(x).

        `V` holds one row per decision, `A` one row per candidate, `owner[j]` the decision of candidate j."""
        baseline = np.clip(self.stages["baseline"].predict(V), 0.0, 1.0)
        if len(A) == 0:
            return np.zeros(0), np.zeros(0), baseline
        X = np.hstack([V[owner], A])
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
                "features": list(MESSAGE_FEATURES),
                "window_h": self.window_h,
                "metrics": self.metrics,
                "stages": {name: stage.to_dict() for name, stage in self.stages.items()},
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> MessageModel:
        data = orjson.loads(raw)
        if data.get("format") != MODEL_FORMAT or tuple(data.get("features", ())) != MESSAGE_FEATURES:
            raise IncompatibleMessageModel(f"message model {data.get('version')} was trained on other features")
        return cls(
            version=str(data["version"]),
            created_at=float(data["created_at"]),
            stages={name: Stage.from_dict(stage) for name, stage in data["stages"].items()},
            window_h=float(data.get("window_h", 24.0)),
            metrics=dict(data.get("metrics", {})),
        )


# ------------------------------------------------------------------------------------------------
# Logged decisions, replayed from events
# ------------------------------------------------------------------------------------------------


def encode_candidates(pairs: Iterable[tuple[str, str | None]]) -> str:
    """`template:product|template:` — the actions a decision could choose (besides sending nothing)."""
    return "|".join(f"{template}:{product or ''}" for template, product in pairs)


def decode_candidates(text: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for part in filter(None, text.split("|")):
        template, _, product = part.partition(":")
        out.append((template, product or None))
    return out


@dataclass
class LoggedDecisions:
    """Decisions that had at least one eligible message, with their candidates and outcomes (arrays)."""

    visitor_ids: list[str]
    recommendation_ids: list[str]
    channels: list[str]
    send_at: np.ndarray
    V: np.ndarray  # decision x VISITOR_COLUMNS
    propensity: np.ndarray
    action: np.ndarray  # candidate row of the logged action, -1 = nothing sent
    control: np.ndarray  # bool: the random control group
    opened: np.ndarray
    clicked: np.ndarray
    attributed: np.ndarray  # a purchase echoing the decision's recommendation id
    converted: np.ndarray  # any purchase by the visitor within the outcome window after send_at
    cand_owner: np.ndarray  # candidate -> decision
    cand_template: list[str]
    cand_product: list[str | None]
    A: np.ndarray  # candidate x ACTION_COLUMNS
    window_h: float

    @property
    def size(self) -> int:
        return len(self.visitor_ids)

    def sent(self) -> np.ndarray:
        return self.action >= 0

    def candidates_of(self, i: int) -> np.ndarray:
        return np.flatnonzero(self.cand_owner == i)

    def subset(self, mask: np.ndarray) -> LoggedDecisions:
        """Decisions where `mask` is true, with their candidates re-indexed."""
        keep = np.flatnonzero(mask)
        new_index = -np.ones(self.size, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        cand_keep = np.flatnonzero(mask[self.cand_owner]) if len(self.cand_owner) else np.zeros(0, dtype=np.int64)
        cand_new = -np.ones(len(self.cand_owner), dtype=np.int64)
        cand_new[cand_keep] = np.arange(len(cand_keep))
        action = np.where(self.action[keep] >= 0, cand_new[np.maximum(self.action[keep], 0)], -1)
        return LoggedDecisions(
            visitor_ids=[self.visitor_ids[i] for i in keep],
            recommendation_ids=[self.recommendation_ids[i] for i in keep],
            channels=[self.channels[i] for i in keep],
            send_at=self.send_at[keep],
            V=self.V[keep],
            propensity=self.propensity[keep],
            action=action,
            control=self.control[keep],
            opened=self.opened[keep],
            clicked=self.clicked[keep],
            attributed=self.attributed[keep],
            converted=self.converted[keep],
            cand_owner=new_index[self.cand_owner[cand_keep]],
            cand_template=[self.cand_template[j] for j in cand_keep],
            cand_product=[self.cand_product[j] for j in cand_keep],
            A=self.A[cand_keep],
            window_h=self.window_h,
        )


@dataclass
class _Pending:
    visitor_id: str
    recommendation_id: str
    channel: str
    send_at: float
    vector: list[float]
    propensity: float
    control: bool
    candidates: list[tuple[str, str | None, list[float]]]
    logged: int  # index into candidates, -1 = none


def replay_decisions(
    events: Iterable[Event],
    catalog: Sequence[CatalogItem],
    window_h: float = 24.0,
    consent_defaults: ConsentDefaults | None = None,
    progress: Callable[[int], None] | None = None,
) -> LoggedDecisions:
    """Fold events (in log or file order) through the profile aggregation code and collect every logged
    decision (`message_sent` with `properties.propensity`) with the visitor's row as of that moment, its
    candidates and its outcomes."""
    # Imported here: the profile service's pure aggregation code is only needed offline.
    from services.profile.aggregations import ItemInfo, SegmentRules, VisitorState, fold_visitor, visitor_features

    defaults = consent_defaults or ConsentDefaults()
    rules = SegmentRules()
    # Only ids, prices and creation times are read (ages are taken at each decision's own time), so the
    # snapshot's own "now" (which items are new arrivals) does not matter here.
    snapshot = build_snapshot(list(catalog), {}, {}, {}, now=0.0)
    templates = {
        item.item_id: item.message.trigger
        for item in catalog
        if item.kind is ItemKind.MESSAGE and item.message is not None
    }
    info = {
        item.item_id: ItemInfo(item.category, item.brand, item.price, item.discount)
        for item in catalog
        if item.kind is ItemKind.PRODUCT
    }
    states: dict[str, VisitorState] = {}
    consents: dict[str, Consent] = {}
    pending: list[_Pending] = []
    purchases: dict[str, list[float]] = {}
    outcomes: dict[str, set[str]] = {}
    count = 0
    for event in events:
        count += 1
        if progress is not None and count % 50_000 == 0:
            progress(count)
        visitor_id = event.visitor_id
        if event.type is EventType.MESSAGE_SENT and "propensity" in event.properties:
            decision = _pending_decision(event, states.get(visitor_id), rules, templates, snapshot, visitor_features)
            if decision is not None:
                pending.append(decision)
            continue
        if event.type is EventType.PURCHASE:
            purchases.setdefault(visitor_id, []).append(event.ts)
        if event.recommendation_id and event.type in (
            EventType.MESSAGE_OPEN,
            EventType.MESSAGE_CLICK,
            EventType.PURCHASE,
        ):
            outcomes.setdefault(event.recommendation_id, set()).add(event.type.value)
        if event.type is EventType.PROFILE_UPDATE:
            changes = consent_changes_from_properties(event.properties)
            if changes:
                consents[visitor_id] = consents.get(visitor_id, Consent()).merged(changes, event.ts)
        # Mirror the aggregator: no behavioural profile without consent.
        if not consents.get(visitor_id, Consent()).allows("personalization", defaults):
            continue
        state = states.get(visitor_id)
        if state is None:
            state = states[visitor_id] = VisitorState(visitor_id)
        fold_visitor(state, event, info.get(event.item_id or ""))
    return _assemble(pending, purchases, outcomes, snapshot, window_h)


def _pending_decision(
    event: Event,
    state: Any,
    rules: Any,
    templates: Mapping[str, str],
    snapshot: ItemSnapshot,
    visitor_features: Callable[..., dict[str, Any]],
) -> _Pending | None:
    props = event.properties
    if not event.recommendation_id:
        return None
    row = visitor_features(state, rules, state.last_seen) if state is not None and state.event_count else None
    view = VisitorView.from_row(event.visitor_id, row)
    decided_at = as_number(props.get("decided_at"))
    send_at = event.ts
    now = decided_at if decided_at == decided_at else send_at
    channel = str(props.get("channel") or event.context.channel or "")
    pairs = decode_candidates(str(props.get("candidates") or ""))
    logged_template = event.item_id if props.get("action") == "send" else None
    product_id = props.get("product_id")
    logged_product = product_id if isinstance(product_id, str) else None
    if logged_template is not None and (logged_template, logged_product) not in pairs:
        pairs.append((logged_template, logged_product))
    candidates: list[tuple[str, str | None, list[float]]] = []
    logged = -1
    for template, product in pairs:
        trigger = templates.get(template)
        if trigger is None:
            continue  # the template left the catalog: its features are unknown
        product_row = snapshot.index.get(product, -1) if product else -1
        if template == logged_template and product == logged_product:
            logged = len(candidates)
        candidates.append((template, product, action_vector(view, trigger, template, product_row, snapshot, now)))
    if logged_template is not None and logged < 0:
        return None
    return _Pending(
        visitor_id=event.visitor_id,
        recommendation_id=event.recommendation_id,
        channel=channel,
        send_at=send_at,
        vector=visitor_vector(view, now, send_at, channel),
        propensity=float(props["propensity"]),  # type: ignore[arg-type]
        control=bool(props.get("control", False)),
        candidates=candidates,
        logged=logged,
    )


def _assemble(
    pending: Sequence[_Pending],
    purchases: Mapping[str, list[float]],
    outcomes: Mapping[str, set[str]],
    snapshot: ItemSnapshot,
    window_h: float,
) -> LoggedDecisions:
    n = len(pending)
    window = window_h * 3600.0
    sorted_purchases = {visitor: np.sort(np.array(ts)) for visitor, ts in purchases.items()}
    cand_owner: list[int] = []
    cand_template: list[str] = []
    cand_product: list[str | None] = []
    rows: list[list[float]] = []
    action = np.full(n, -1, dtype=np.int64)
    converted = np.zeros(n, dtype=bool)
    for i, decision in enumerate(pending):
        for k, (template, product, vector) in enumerate(decision.candidates):
            if k == decision.logged:
                action[i] = len(cand_owner)
            cand_owner.append(i)
            cand_template.append(template)
            cand_product.append(product)
            rows.append(vector)
        times = sorted_purchases.get(decision.visitor_id)
        if times is not None:
            first = np.searchsorted(times, decision.send_at, side="left")
            converted[i] = first < len(times) and times[first] < decision.send_at + window
    seen = [outcomes.get(d.recommendation_id, set()) for d in pending]
    return LoggedDecisions(
        visitor_ids=[d.visitor_id for d in pending],
        recommendation_ids=[d.recommendation_id for d in pending],
        channels=[d.channel for d in pending],
        send_at=np.array([d.send_at for d in pending], dtype=np.float64),
        V=np.array([d.vector for d in pending], dtype=np.float64).reshape(n, len(VISITOR_COLUMNS)),
        propensity=np.array([d.propensity for d in pending], dtype=np.float64),
        action=action,
        control=np.array([d.control for d in pending], dtype=bool),
        opened=np.array(["message_open" in s for s in seen], dtype=bool),
        clicked=np.array(["message_click" in s for s in seen], dtype=bool),
        attributed=np.array(["purchase" in s for s in seen], dtype=bool),
        converted=converted,
        cand_owner=np.array(cand_owner, dtype=np.int64),
        cand_template=cand_template,
        cand_product=cand_product,
        A=np.array(rows, dtype=np.float64).reshape(len(rows), len(ACTION_COLUMNS)),
        window_h=window_h,
    )


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageTrainConfig:
    window_h: float = 24.0
    validation_fraction: float = 0.25
    num_boost_round: int = 300
    early_stopping_rounds: int = 30
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 30
    min_rows: int = 60  # fewer rows (or fewer than 5 of each class) -> a constant rate for the stage
    seed: int = 7
    threads: int = 2


@dataclass
class MessageTrainResult:
    model: MessageModel
    metrics: dict[str, Any]


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    if len(y) == 0 or y.all() or not y.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def _fit_stage(
    X: np.ndarray, y: np.ndarray, order: np.ndarray, names: Sequence[str], config: MessageTrainConfig
) -> tuple[Stage, dict[str, Any]]:
    """Time split: the latest `validation_fraction` of rows stops boosting early and reports the AUC."""
    n, positives = len(y), int(y.sum())
    rate = float(y.mean()) if n else 0.0
    info: dict[str, Any] = {"rows": n, "positives": positives, "rate": round(rate, 5)}
    if n < config.min_rows or positives < 5 or n - positives < 5:
        info["kind"] = "constant"
        return Stage(None, rate), info
    ranked = X[order], y[order]
    cut = int(n * (1 - config.validation_fraction))
    X_train, y_train, X_valid, y_valid = ranked[0][:cut], ranked[1][:cut], ranked[0][cut:], ranked[1][cut:]
    categorical = [c for c in CATEGORICAL if c in names]
    params = {
        "objective": "binary",
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": config.min_data_in_leaf,
        "min_data_per_group": 20,
        "cat_smooth": 20.0,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "seed": config.seed,
        "num_threads": config.threads,
        "verbose": -1,
        "deterministic": True,
    }
    train_set = lgb.Dataset(X_train, y_train.astype(float), feature_name=list(names), categorical_feature=categorical)
    has_valid = bool(len(y_valid) and y_valid.any() and not y_valid.all())
    if has_valid:
        valid_set = lgb.Dataset(X_valid, y_valid.astype(float), reference=train_set)
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=config.num_boost_round,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)],
        )
        auc = _auc(y_valid, np.asarray(booster.predict(X_valid, num_iteration=booster.best_iteration)))
        info["valid_auc"] = round(auc, 4) if auc is not None else None
    else:
        booster = lgb.train(params, train_set, num_boost_round=min(100, config.num_boost_round))
    info["kind"] = "lightgbm"
    info["trees"] = booster.num_trees()
    # Keep only the trees early stopping chose, so serving predicts with the validated model.
    best = booster.best_iteration or booster.current_iteration()
    booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    return Stage(booster, rate), info


def train_message_model(data: LoggedDecisions, config: MessageTrainConfig | None = None) -> MessageTrainResult:
    """Fit the four stages on logged decisions; raises ValueError when there is nothing to learn from."""
    config = config or MessageTrainConfig()
    if data.size == 0:
        raise ValueError("no logged message decisions (message_sent events with properties.propensity)")
    sent = data.sent()
    if not sent.any():
        raise ValueError("no message was sent in the logged decisions")
    started = time.perf_counter()
    rows = data.action[sent]
    owners = np.flatnonzero(sent)
    X = np.hstack([data.V[owners], data.A[rows]])
    order = np.argsort(data.send_at[owners], kind="stable")
    stages: dict[str, Stage] = {}
    metrics: dict[str, Any] = {"decisions": data.size, "sent": int(sent.sum()), "control": int(data.control.sum())}
    opened = data.opened[owners]
    clicked = data.clicked[owners]
    stages["open"], metrics["open"] = _fit_stage(X, opened, order, MESSAGE_FEATURES, config)
    mask = opened
    stages["click"], metrics["click"] = _fit_stage(
        X[mask], clicked[mask], np.argsort(data.send_at[owners][mask], kind="stable"), MESSAGE_FEATURES, config
    )
    mask = clicked
    stages["purchase"], metrics["purchase"] = _fit_stage(
        X[mask],
        data.attributed[owners][mask],
        np.argsort(data.send_at[owners][mask], kind="stable"),
        MESSAGE_FEATURES,
        config,
    )
    unsent = ~sent
    stages["baseline"], metrics["baseline"] = _fit_stage(
        data.V[unsent],
        data.converted[unsent],
        np.argsort(data.send_at[unsent], kind="stable"),
        VISITOR_COLUMNS,
        config,
    )
    version = f"msg-{wall_datetime().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    model = MessageModel(version, wall_time(), stages, data.window_h)
    metrics.update(uplift_check(model, data))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    model.metrics = metrics
    return MessageTrainResult(model, metrics)


def uplift_check(model: MessageModel, data: LoggedDecisions) -> dict[str, Any]:
    """The model's mean predicted uplift of the logged sends next to the incremental conversion measured
    against the random control group (non-control sends vs control, same eligibility population)."""
    sent = data.sent()
    if not sent.any():
        return {}
    owners = np.flatnonzero(sent)
    uplift, _, _ = model.uplift(data.V[owners], data.A[data.action[owners]], np.arange(len(owners)))
    out: dict[str, Any] = {"predicted_uplift": round(float(uplift.mean()), 5)}
    control = data.control
    if control.sum() >= 20:
        treated_rate = float(data.converted[sent & ~control].mean())
        control_rate = float(data.converted[control].mean())
        se = math.sqrt(
            treated_rate * (1 - treated_rate) / max(int((sent & ~control).sum()), 1)
            + control_rate * (1 - control_rate) / int(control.sum())
        )
        out["measured_uplift"] = round(treated_rate - control_rate, 5)
        out["measured_uplift_ci95"] = [
            round(treated_rate - control_rate - 1.96 * se, 5),
            round(treated_rate - control_rate + 1.96 * se, 5),
        ]
    return out
