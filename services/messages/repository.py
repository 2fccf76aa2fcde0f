"""Storage for next-best messages: visitor rows in bulk, consent, send history (caps and cooldowns), traits,
personas, the stock watch (back-in-stock) and the message model. Wraps the recommend repository (any object of
the `SharedStorage` shape) so the service keeps one Redis/Feast connection, and is the only message module that
talks to storage. It does not import the recommend service: the recommend app composes the two."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

import orjson

from services.common.catalog import CatalogItem
from services.common.consent import Consent, ConsentDefaults
from services.common.events import Event
from services.common.models import ModelIndex, ModelKind, ModelRegistry
from services.common.storage import Namespace, Store
from services.features import schema as F
from services.messages.history import SendHistory

log = logging.getLogger(__name__)

# Visitor-keyed namespaces of this module. Erasure must delete a visitor's key in MESSAGE_HISTORY too.
MESSAGE_HISTORY: Final = Namespace.MESSAGE_HISTORY
MESSAGE_STOCK: Final = "msgstock"
# The visitor-row features the message policy and its model read (a subset keeps the bulk read fast).
MESSAGE_VISITOR_FEATURES: Final[tuple[str, ...]] = (
    "event_count",
    "cart_items",
    "cart_updated_ts",
    "cart_value",
    "recent_items",
    "purchased_items",
    "top_categories",
    "top_category_scores",
    "last_seen_ts",
    "last_purchase_ts",
    "persona_id",
    "hour_histogram",
    "city",
    "locale",
    "rfm_frequency",
    "views_7d",
    "views_30d",
    "carts_7d",
    "purchases_30d",
    "session_depth",
    "discount_affinity",
    "price_sensitivity",
    "payday_purchase_share",
    "typical_price_viewed",
)
assert set(MESSAGE_VISITOR_FEATURES) <= set(F.VISITOR_FEATURES)


# Proto field of each feature kind. Lists are read without WhichOneof: unset and empty mean the same here.
_LIST_FIELDS: Final = {"str_list": "string_list_val", "float_list": "double_list_val"}
_DECODE_PLAN: Final = tuple((name, _LIST_FIELDS.get(F.VISITOR_FEATURES[name])) for name in MESSAGE_VISITOR_FEATURES)
VIEW_CACHE_S: Final = 60.0


def _decode_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """Feast ValueProtos of one row -> Python values (None when unset)."""
    row: dict[str, Any] = {}
    for name, list_field in _DECODE_PLAN:
        value = values.get(name)
        if value is None:
            continue
        if list_field is not None:
            row[name] = list(getattr(value, list_field).val)
            continue
        kind = value.WhichOneof("val")
        row[name] = None if kind is None or kind == "null_val" else getattr(value, kind)
    return row


class SharedStorage(Protocol):
    """What messages use of the recommend repository's connections (services/recommend/repository.py)."""

    store: Store
    feature_store: Any  # feast.FeatureStore
    models: ModelRegistry

    def log_events_async(
        self, events: list[Event | dict[str, Any]], record: tuple[str, Mapping[str, Any], int] | None = None
    ) -> bool: ...

    def flush(self, timeout: float = 10.0) -> None: ...

    def catalog(self) -> list[CatalogItem]: ...

    def logged_events(self) -> Iterator[Event]: ...


class MessageRepository:
    def __init__(self, base: SharedStorage):
        self.base = base
        self.store = base.store
        self._fast_read = True
        self._view: Any = None  # the visitor FeatureView: rebuilding it from the registry costs ~25 ms a call
        self._view_at = -math.inf

    # -- visitors ---------------------------------------------------------------------------------
    def visitor_rows(self, visitor_ids: Sequence[str], chunk: int = 1000) -> list[dict[str, Any] | None]:
        """Online rows of many visitors in one store round trip per chunk (None = unknown visitor).

        Feast's `get_online_features` spends ~0.6 ms per entity building its response; the provider's
        `online_read` returns the stored protos directly (~0.15 ms per entity for these features).
        """
        rows: list[dict[str, Any] | None] = []
        for start in range(0, len(visitor_ids), chunk):
            rows.extend(self._rows(visitor_ids[start : start + chunk]))
        return rows

    def _rows(self, visitor_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        if not visitor_ids:
            return []
        if self._fast_read:
            try:
                return self._rows_fast(visitor_ids)
            except (AttributeError, TypeError, ImportError) as exc:  # a Feast upgrade moved the provider API
                log.warning("bulk visitor read falls back to get_online_features: %s", type(exc).__name__)
                self._fast_read = False
        feature_store = self.base.feature_store
        response = feature_store.get_online_features(
            features=[f"{F.VISITOR_VIEW}:{name}" for name in MESSAGE_VISITOR_FEATURES],
            entity_rows=[{F.VISITOR_KEY: v} for v in visitor_ids],
        ).to_dict()
        out: list[dict[str, Any] | None] = []
        for i in range(len(visitor_ids)):
            row = {name: response[name][i] for name in MESSAGE_VISITOR_FEATURES}
            out.append(row if row.get("event_count") else None)
        return out

    def _rows_fast(self, visitor_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        feature_store = self.base.feature_store
        provider = feature_store._get_provider()
        if time.monotonic() - self._view_at > VIEW_CACHE_S:
            self._view = feature_store.get_feature_view(F.VISITOR_VIEW)
            self._view_at = time.monotonic()
        view = self._view
        keys = [EntityKey(join_keys=[F.VISITOR_KEY], entity_values=[Value(string_val=v)]) for v in visitor_ids]
        read = provider.online_read(
            config=feature_store.config, table=view, entity_keys=keys, requested_features=list(MESSAGE_VISITOR_FEATURES)
        )
        out: list[dict[str, Any] | None] = []
        for _, values in read:
            if not values:
                out.append(None)
                continue
            row = _decode_row(values)
            out.append(row if row.get("event_count") else None)
        return out

    def refusing_analytics(self, visitor_ids: Iterable[str], defaults: ConsentDefaults) -> set[str]:
        """Those of the visitors whose stored consent refuses `analytics`: training must not use their data."""
        unique = sorted(set(visitor_ids))
        refused: set[str] = set()
        for start in range(0, len(unique), 1000):
            chunk = unique[start : start + 1000]
            refused.update(
                v for v, c in zip(chunk, self.consents(chunk), strict=True) if not c.allows("analytics", defaults)
            )
        return refused

    def consents(self, visitor_ids: Sequence[str]) -> list[Consent]:
        return [Consent.from_bytes(raw) for raw in self.store.get_many(Namespace.CONSENT, visitor_ids)]

    def visitor_traits(self, visitor_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Traits from `profile_update` events (first name, ...), kept in the profile service's visitor state."""
        out: list[dict[str, Any]] = []
        for raw in self.store.get_many(Namespace.VISITOR_STATE, visitor_ids):
            traits = orjson.loads(raw).get("traits") if raw else None
            out.append(traits if isinstance(traits, dict) else {})
        return out

    def persona_profiles(self) -> dict[int, dict[str, Any]]:
        """Persona descriptions by id (name and top traits); empty when no persona model exists."""
        serving = self.base.models.serving_blob(ModelKind.PERSONAS)
        if serving is None:
            return {}
        try:
            data = orjson.loads(serving[1])
            return {int(p["persona_id"]): p for p in data.get("personas", []) if isinstance(p, dict)}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("persona model is unreadable: tones fall back to behaviour")
            return {}

    # -- send history (caps and cooldowns) -----------------------------------------------------------
    def histories(self, visitor_ids: Sequence[str]) -> list[bytes | None]:
        return self.store.get_many(MESSAGE_HISTORY, visitor_ids)

    def record_send(
        self, visitor_id: str, attempt: Callable[[SendHistory], str | None], now: float, keep_s: float, ttl_s: int
    ) -> tuple[str | None, SendHistory]:
        """Check and consume the visitor's caps in one compare-and-set on the stored history: `attempt` (e.g.
        `SendHistory.try_send`) runs on the current stored value and its send is stored only if nobody wrote
        the history in between (else it runs again on the new value). Returns (refusal or None, the history
        as stored)."""
        outcome: list[tuple[str | None, SendHistory]] = []

        def change(raw: bytes | None) -> bytes:
            history = SendHistory.from_bytes(raw)
            refused = attempt(history)
            outcome[:] = [(refused, history)]
            return history.to_bytes(now, keep_s)

        self.store.update(MESSAGE_HISTORY, visitor_id, change, ttl_s)
        return outcome[0]

    # -- stock watch (back in stock) -----------------------------------------------------------------
    def stock_watch(self) -> bytes | None:
        return self.store.get(MESSAGE_STOCK, "watch")

    def save_stock_watch(self, blob: bytes) -> None:
        self.store.put(MESSAGE_STOCK, "watch", blob)

    # -- decisions ----------------------------------------------------------------------------------
    def log_decision(self, event: Event, recommendation_id: str, record: Mapping[str, Any], ttl_s: int) -> bool:
        """Queue the decision's `message_sent` event and its recommendation record (written off the request)."""
        return self.base.log_events_async([event], (recommendation_id, record, ttl_s))

    def flush(self, timeout: float = 10.0) -> None:
        self.base.flush(timeout)

    # -- model --------------------------------------------------------------------------------------
    def save_model(self, version: str, blob: bytes, created_at: float) -> None:
        self.base.models.publish(ModelKind.MESSAGE, version, blob, created_at)

    def model_index(self) -> ModelIndex:
        return self.base.models.index(ModelKind.MESSAGE)

    def model_blob(self, version: str, index: ModelIndex | None = None) -> bytes | None:
        """The model's bytes, checked against the published sha256 (DamagedModel when they differ)."""
        return self.base.models.blob(ModelKind.MESSAGE, version, index)

    # -- training inputs ------------------------------------------------------------------------------
    def catalog(self) -> list[CatalogItem]:
        return self.base.catalog()

    def logged_events(self) -> Iterator[Event]:
        return self.base.logged_events()
