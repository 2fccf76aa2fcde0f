"""Stage two: the feature matrix (vectorised numpy, shared by training and serving), the LightGBM model,
and explanations from its feature contributions."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import orjson

from services.common.catalog import Targeting
from services.features import schema as F
from services.features.item_cache import CATEGORY_CODES, ITEM_BLOCK, ItemColumns, category_code
from services.features.store import file_lock
from services.recommend.ranking.candidates import VisitorVector
from services.recommend.ranking.fusion import CandidateFusion
from services.recommend.ranking.item_embeddings import ItemEmbeddings
from services.recommend.ranking.next_item import lookup
from services.recommend.ranking.reasons import Locale, say

log = logging.getLogger(__name__)
FEATURE_INDEX = {name: i for i, name in enumerate(F.RANKER_FEATURES)}
N_FEATURES = len(F.RANKER_FEATURES)
ITEM_BLOCK_COLUMNS = np.array([FEATURE_INDEX[name] for name in ITEM_BLOCK])
PERSONAL_COLUMNS = np.array([name.startswith(F.PERSONAL_FEATURE_PREFIXES) for name in F.RANKER_FEATURES])


def visitor_columns(visitor: VisitorVector, now: float) -> dict[str, float]:
    """The v_ columns: identical for every candidate of one request."""
    if not visitor.known:
        return {}
    v = visitor.value
    impressions, clicks = v("rec_impressions_7d"), v("rec_clicks_7d")
    price = v("typical_price_viewed")
    return {
        "v_views_24h": v("views_24h"),
        "v_views_7d": v("views_7d"),
        "v_carts_7d": v("carts_7d"),
        "v_purchases_30d": v("purchases_30d"),
        "v_session_depth": v("session_depth"),
        "v_secs_since_last_visit": now - v("last_seen_ts"),
        "v_secs_since_last_purchase": now - v("last_purchase_ts"),
        "v_log_typical_price_viewed": math.log1p(price) if price == price else math.nan,
        "v_discount_affinity": v("discount_affinity"),
        "v_cart_value": v("cart_value"),
        "v_rfm_frequency": v("rfm_frequency"),
        "v_rec_ctr_7d": ((clicks if clicks == clicks else 0.0) + 1.0)
        / ((impressions if impressions == impressions else 0.0) + 20.0),
        "v_price_sensitivity": v("price_sensitivity"),
        "v_persona_id": v("persona_id") if v("persona_id") >= 0 else math.nan,
        "v_lifecycle_code": float(F.LIFECYCLE_CODES.get(str(visitor.row.get("lifecycle") or ""), -1)),
        "v_journey_code": float(F.JOURNEY_CODES.get(str(visitor.row.get("journey_stage") or ""), -1)),
    }


def targeting_match(targeting: Targeting | None, visitor: VisitorVector, persona: str | None) -> float:
    """Share of the soft targeting criteria (categories, personas, segments) the visitor meets; 0.5 = none set."""
    if targeting is None:
        return 0.5
    checks: list[bool] = []
    if targeting.categories:
        checks.append(any(c in visitor.category_affinity for c in targeting.categories))
    if targeting.personas:
        checks.append(persona is not None and persona in targeting.personas)
    if targeting.segments:
        segments = {str(visitor.row.get(k)) for k in ("lifecycle", "value_tier", "journey_stage")}
        checks.append(bool(segments & set(targeting.segments)))
    return sum(checks) / len(checks) if checks else 0.5


def feature_matrix(
    visitor: VisitorVector,
    context: Mapping[str, int],
    items: ItemColumns,
    signals: Mapping[str, np.ndarray],
    targeting: np.ndarray,
    now: float,
    personal: bool = True,
) -> np.ndarray:
    n = len(items.rows)
    if n == 0:
        return np.full((0, N_FEATURES), np.nan, dtype=np.float64)
    # The columns every candidate shares (visitor, context) are written once into one row that fills the whole
    # matrix: one write instead of a strided write per column.
    shared = np.full(N_FEATURES, np.nan, dtype=np.float64)
    for name in ("hour", "day_of_week", "is_weekend", "is_payday_window", "device_code", "channel_code"):
        shared[FEATURE_INDEX[f"c_{name}"]] = context.get(name, math.nan)
    if personal and visitor.known:
        for name, value in visitor_columns(visitor, now).items():
            shared[FEATURE_INDEX[name]] = value
    X = np.empty((n, N_FEATURES), dtype=np.float64)
    X[:] = shared
    if personal and visitor.known:
        # Crosses by table lookup over codes: no per-candidate Python.
        category_table = np.zeros(CATEGORY_CODES)
        for category, score in visitor.category_affinity.items():
            category_table[category_code(category)] = score
        X[:, FEATURE_INDEX["x_category_affinity"]] = category_table[items.category_code]
        brand_table = np.zeros(len(items.brand_index) + 1)
        for brand, score in visitor.brand_affinity.items():
            code = items.brand_index.get(brand)
            if code is not None:
                brand_table[code] = score
        X[:, FEATURE_INDEX["x_brand_affinity"]] = brand_table[items.brand_code]
        typical = visitor.value("typical_price_viewed")
        if typical == typical and typical > 0:
            X[:, FEATURE_INDEX["x_price_ratio"]] = items.price / typical
        X[:, FEATURE_INDEX["x_in_cart"]] = _row_values(
            items.rows, {items.index[i]: 1.0 for i in visitor.cart_items if i in items.index}
        )
        recently: dict[int, float] = {}
        for rank, item_id in enumerate(visitor.recent_items):
            row = items.index.get(item_id)
            if row is not None:
                recently[row] = 1.0 / (1 + rank)  # an item seen twice: its older view's value, as before
        X[:, FEATURE_INDEX["x_recently_viewed"]] = _row_values(items.rows, recently)
        X[:, FEATURE_INDEX["x_targeting_match"]] = targeting
        # Candidate signals (next-item scores, generator): computed once by the generators, for these rows.
        for name, values in signals.items():
            X[:, FEATURE_INDEX[name]] = values
    X[:, ITEM_BLOCK_COLUMNS] = items.static
    X[:, FEATURE_INDEX["i_age_days"]] = items.age_days
    X[:, FEATURE_INDEX["i_slot_ctr_7d"]] = items.slot_ctr
    return X


def _row_values(rows: np.ndarray, values: Mapping[int, float]) -> np.ndarray:
    """`values` per snapshot row (0 where absent): a few rows looked up among many candidates by a search in
    the sorted keys, not one pass over the candidates per key."""
    if not values:
        return np.zeros(len(rows))
    keys = np.fromiter(values.keys(), dtype=np.int64, count=len(values))
    found = np.fromiter(values.values(), dtype=np.float64, count=len(values))
    order = np.argsort(keys)
    return lookup(keys[order], found[order], rows)


@dataclass(frozen=True)
class ModelMeta:
    version: str
    created_at: float
    features: tuple[str, ...]
    feature_service: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    personal: bool = True

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": self.version,
                "created_at": self.created_at,
                "features": list(self.features),
                "feature_service": self.feature_service,
                "metrics": dict(self.metrics),
                "params": dict(self.params),
                "personal": self.personal,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> ModelMeta:
        data = orjson.loads(raw)
        return cls(
            version=data["version"],
            created_at=float(data["created_at"]),
            features=tuple(data["features"]),
            feature_service=data.get("feature_service", ""),
            metrics=data.get("metrics", {}),
            params=data.get("params", {}),
            personal=bool(data.get("personal", True)),
        )


class IncompatibleModel(ValueError):
    """The booster's features differ from the FeatureService/ranker columns this code serves."""


class CorruptModel(ValueError):
    """The stored model text is damaged (truncated, altered): it is never handed to LightGBM."""


def verify_model_text(model_text: bytes, sha256: str | None = None) -> None:
    """Raise CorruptModel unless the text is whole. LightGBM aborts the whole process (a C++ abort, not an
    exception) on some damaged model strings, so damage must be found before parsing: the digest stored at save
    time when there is one, and LightGBM's own structure (header, end of trees, end of parameters) always."""
    if sha256 is not None and hashlib.sha256(model_text).hexdigest() != sha256:
        raise CorruptModel("model text does not match its stored sha256")
    if not model_text.startswith(b"tree\n") or b"\nend of trees\n" not in model_text:
        raise CorruptModel("model text is not a whole LightGBM model")
    if b"\nend of parameters\n" not in model_text[model_text.index(b"\nend of trees\n") :]:
        raise CorruptModel("model text is truncated")


def compile_native(model_text: bytes, version: str, cache_dir: Path) -> Any | None:
    """The model compiled to native code with lleaves (LLVM): about 12x faster than LightGBM's own predict
    on 400 candidates (0.06 ms against 0.75 ms), identical scores. None when lleaves is unavailable or fails,
    and the service falls back to LightGBM. The shared object is cached per version, so workers share it."""
    try:
        import lleaves
    except ImportError:
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c for c in version if c.isalnum() or c in "-_.")
    source, library = cache_dir / f"{safe}.txt", cache_dir / f"{safe}.so"
    try:
        with file_lock(cache_dir / f"{safe}.lock"):
            if not source.exists():
                source.write_bytes(model_text)
            compiled = lleaves.Model(model_file=str(source))
            compiled.compile(cache=str(library))
        return compiled
    except Exception as exc:  # a compiler problem must never take serving down: LightGBM still works
        log.warning("native compilation of model %s failed, using LightGBM: %s", version, type(exc).__name__)
        return None


@dataclass
class RankerModel:
    booster: lgb.Booster
    meta: ModelMeta
    # Item embeddings learned with the ranker (its x_embedding* columns), saved and loaded with it; None for
    # a model trained without them (the embedding generator is then absent).
    embeddings: ItemEmbeddings | None = None
    # The learned cut of the candidate pool (services/recommend/ranking/fusion.py), saved and loaded with the
    # ranker: the ranker was trained on the candidates it keeps. None: candidates as without a model of it.
    fusion: CandidateFusion | None = None
    _predictor: Any = None
    _native: Any = None

    @classmethod
    def from_bytes(cls, model_text: bytes, meta: ModelMeta, compile_dir: Path | None = None) -> RankerModel:
        verify_model_text(model_text)
        booster = lgb.Booster(model_str=model_text.decode())
        model = cls(booster, meta)
        model.check_compatible()
        if compile_dir is not None:
            model._native = compile_native(model_text, meta.version, compile_dir)
        # Booster.predict builds a new predictor (and deep-copies its parameters) on every call, which cost
        # about as much as scoring 500 candidates; one long-lived predictor removes that per-request cost.
        try:
            model._predictor = lgb.basic._InnerPredictor.from_booster(booster, {"num_threads": 1})
        except (AttributeError, TypeError):  # a LightGBM without this internal API: use the public path
            model._predictor = None
        return model

    def check_compatible(self) -> None:
        names = tuple(self.booster.feature_name())
        if names != F.RANKER_FEATURES or self.meta.features != F.RANKER_FEATURES:
            missing = sorted(set(F.RANKER_FEATURES) - set(names))
            extra = sorted(set(names) - set(F.RANKER_FEATURES))
            raise IncompatibleModel(
                f"model {self.meta.version} features differ (missing {missing[:5]}, extra {extra[:5]})"
            )
        if self.meta.feature_service != F.FEATURE_SERVICE:
            raise IncompatibleModel(f"model {self.meta.version} was trained on {self.meta.feature_service!r}")

    def predict(self, X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros(0)
        if not self.meta.personal:
            X = X.copy()
            X[:, PERSONAL_COLUMNS] = np.nan
        if self._native is not None:
            return np.asarray(self._native.predict(np.ascontiguousarray(X, dtype=np.float64), n_jobs=1))
        if self._predictor is not None:
            return np.asarray(
                self._predictor.predict(X, num_iteration=self.booster.best_iteration or -1), dtype=np.float64
            )
        return np.asarray(self.booster.predict(X, num_threads=1), dtype=np.float64)

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """Per-row SHAP-style contributions (LightGBM pred_contrib), without the bias column."""
        contrib = np.asarray(self.booster.predict(X, pred_contrib=True, num_threads=1))
        return contrib[:, :N_FEATURES]


# Reasons a marketer reads. Each maps a feature to a sentence built from the item and the visitor.
def explain_item(
    contributions: np.ndarray,
    X_row: np.ndarray,
    item_title: str,
    category: str | None,
    brand: str | None,
    visitor: VisitorVector,
    recent_in_category: int,
    recent_titles: Sequence[str],
    context_label: str,
    source: str,
    limit: int = 3,
    locale: Locale = "en",
) -> list[str]:
    order = np.argsort(-contributions)
    reasons: list[str] = []
    for j in order:
        if contributions[j] <= 0 or len(reasons) >= limit:
            break
        name = F.RANKER_FEATURES[j]
        value = X_row[j]
        text = _reason(name, value, category, brand, recent_in_category, recent_titles, context_label, locale)
        if text and text not in reasons:
            reasons.append(text)
    if not reasons:
        reasons.append(_source_reason(source, category, context_label, locale))
    return reasons


def _reason(
    name: str,
    value: float,
    category: str | None,
    brand: str | None,
    recent_in_category: int,
    recent_titles: Sequence[str],
    context_label: str,
    locale: Locale = "en",
) -> str | None:
    """The reason a feature gives for an item, worded in `locale` (services/recommend/ranking/reasons.py), or None."""
    if name == "x_category_affinity" and value > 0 and category:
        if recent_in_category > 0:
            return say(locale, "viewed_in_category", n=recent_in_category, category=category)
        return say(locale, "browses_category", category=category)
    if name == "x_brand_affinity" and value > 0 and brand:
        return say(locale, "likes_brand", brand=brand)
    if name in ("x_covisitation", "x_last_item_transition", "x_two_step") and value > 0 and recent_titles:
        return say(locale, "chosen_after", title=recent_titles[0])
    if name in ("x_embedding", "x_embedding_last") and value > 0 and recent_titles:
        return say(locale, "chosen_by_people", title=recent_titles[0])
    if name == "x_shared_tags" and value > 0 and recent_titles:
        return say(locale, "like_item", title=recent_titles[0])
    if name == "x_recently_viewed" and value > 0:
        return say(locale, "seen_recently")
    if name == "x_in_cart" and value > 0:
        return say(locale, "in_cart")
    if name == "i_discount" and value >= 0.05:
        return say(locale, "discount", pct=round(value * 100))
    if name in ("i_trend_score", "i_views_24h") and value > 0:
        return say(locale, "trending", context=context_label)
    if name in ("i_purchases_7d", "i_conversion_7d"):
        return say(locale, "popular_with_buyers")
    if name == "i_age_days" and value <= 14:
        return say(locale, "new_arrival")
    if name == "x_price_ratio" and 0.5 <= value <= 1.5:
        return say(locale, "usual_price")
    if name == "c_is_payday_window" and value == 1:
        return say(locale, "payday")
    if name == "i_ctr_7d" or name == "i_slot_ctr_7d":
        return say(locale, "clicked_here")
    return None


def _source_reason(source: str, category: str | None, context_label: str, locale: Locale = "en") -> str:
    if source == "trending":
        return say(locale, "trending", context=context_label)
    if source == "new_arrival":
        return say(locale, "new_arrival")
    if source == "category" and category:
        return say(locale, "more_from_category", category=category)
    return say(locale, "recent_activity")
