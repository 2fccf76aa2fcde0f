"""The only module of the recommend service that talks to storage (the store and Feast)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
from feast import FeatureStore

from services.common.catalog import CatalogItem
from services.common.clock import wall_time
from services.common.consent import Consent, ConsentDefaults
from services.common.errors import StorageUnavailable
from services.common.events import Event, envelope, open_envelope
from services.common.item_changes import changed_items
from services.common.models import ModelIndex, ModelKind, ModelRegistry
from services.common.settings import CommonSettings
from services.common.storage import (
    Namespace,
    PendingEvent,
    Store,
    bump_catalog_version,
    catalog_version,
    open_store,
    save_catalog,
)
from services.features import schema as F
from services.features.online import OnlineRowReader
from services.features.store import offline_read_lock, online_rows, open_feature_store
from services.recommend.ranking.ranker import ModelMeta

log = logging.getLogger(__name__)
RecordWrite = tuple[str, Mapping[str, Any], int]  # recommendation id, record, ttl seconds


class ItemGone(LookupError):
    """The catalog item was deleted while it was being updated."""


class RecommendRepository:
    def __init__(self, store: Store, feature_store: FeatureStore, offline_dir: Path | None = None):
        self.store = store
        self.feature_store = feature_store
        self.offline_dir = offline_dir  # the offline store's folder: its read lock is held while joining
        self.models = ModelRegistry(store)
        self._visitor_refs = F.visitor_feature_refs()
        self._reader: OnlineRowReader | None = None
        self._item_reader: OnlineRowReader | None = None
        # Impression events and recommendation records, written off the request path.
        self._impressions: queue.Queue[tuple[list[Event | dict[str, Any]], RecordWrite | None]] = queue.Queue(
            maxsize=10_000
        )
        self._writer: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def open(cls, settings: CommonSettings) -> RecommendRepository:
        return cls(open_store(settings), open_feature_store(settings), settings.offline_dir)

    def close(self) -> None:
        self._stop.set()
        if self._writer:
            self._writer.join(5)
        self.store.close()

    # -- visitor ----------------------------------------------------------------------------------
    def visitor_row(self, visitor_id: str) -> dict[str, Any] | None:
        """The visitor's online row from Feast's online store. None when the visitor is unknown."""
        if self._reader is None:
            self._reader = OnlineRowReader(self.feature_store, F.VISITOR_VIEW)
        row = self._reader.read([visitor_id])[0]
        return row if row and row.get("event_count") else None

    def visitor_row_via_sdk(self, visitor_id: str) -> dict[str, Any] | None:
        """The same row through `get_online_features` (the slower, fully general SDK path)."""
        response = self.feature_store.get_online_features(
            features=self._visitor_refs, entity_rows=[{F.VISITOR_KEY: visitor_id}]
        ).to_dict()
        row = {name: values[0] for name, values in response.items() if name != F.VISITOR_KEY}
        return row if row.get("event_count") else None

    def consent(self, visitor_id: str) -> Consent:
        return Consent.from_bytes(self.store.get(Namespace.CONSENT, visitor_id))

    def refusing(self, purpose: str, visitor_ids: Iterable[str], defaults: ConsentDefaults) -> set[str]:
        """The visitors among `visitor_ids` whose consent (or the default) refuses `purpose`."""
        ids = list(dict.fromkeys(visitor_ids))
        refused: set[str] = set()
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            raws = self.store.get_many(Namespace.CONSENT, chunk)
            refused.update(
                v for v, raw in zip(chunk, raws, strict=True) if not Consent.from_bytes(raw).allows(purpose, defaults)
            )
        return refused

    # -- catalog and item cache inputs --------------------------------------------------------------
    def upsert_catalog(self, items: Sequence[CatalogItem]) -> None:
        save_catalog(self.store, items)

    def catalog(self) -> list[CatalogItem]:
        return list(self.iter_catalog())

    def catalog_item(self, item_id: str) -> CatalogItem | None:
        raw = self.store.get(Namespace.CATALOG, item_id)
        return CatalogItem.model_validate_json(raw) if raw else None

    def update_catalog_item(self, item_id: str, change: Callable[[CatalogItem], CatalogItem]) -> CatalogItem | None:
        """Compare-and-set one item (concurrent partial updates both land); None when there is no such item.
        `change` may raise (an invalid merge): nothing is written then."""
        if self.store.get(Namespace.CATALOG, item_id) is None:
            return None

        def apply(raw: bytes | None) -> bytes:
            if raw is None:  # deleted between the check and the write
                raise ItemGone(item_id)
            return change(CatalogItem.model_validate_json(raw)).model_dump_json().encode()

        try:
            stored = self.store.update(Namespace.CATALOG, item_id, apply)
        except ItemGone:
            return None
        bump_catalog_version(self.store)
        return CatalogItem.model_validate_json(stored)

    def delete_catalog_item(self, item_id: str) -> bool:
        deleted = self.store.delete(Namespace.CATALOG, [item_id]) > 0
        if deleted:
            bump_catalog_version(self.store)
        return deleted

    def iter_catalog(self) -> Iterator[CatalogItem]:
        """Parsed one at a time (the item cache keeps columns, not 100,000 model objects)."""
        for _, raw in self.store.scan(Namespace.CATALOG):
            yield CatalogItem.model_validate_json(raw)

    def catalog_version(self) -> bytes | None:
        return catalog_version(self.store)

    def item_stats(self, item_ids: Sequence[str], chunk: int = 1000) -> dict[str, dict[str, Any]]:
        """Item statistics rows from the online store, read in chunks. Between chunks the thread yields the
        GIL, so a background refresh of a large catalog does not stall requests in flight."""
        if self._item_reader is None:
            self._item_reader = OnlineRowReader(self.feature_store, F.ITEM_VIEW)
        stats: dict[str, dict[str, Any]] = {}
        for start in range(0, len(item_ids), chunk):
            keys = item_ids[start : start + chunk]
            for item_id, row in zip(keys, self._item_reader.read(keys), strict=True):
                if row is not None and (row.get("views_7d") is not None or row.get("impressions_7d") is not None):
                    stats[item_id] = row
            time.sleep(0)
        return stats

    def changed_items(self, since: float, until: float) -> set[str] | None:
        return changed_items(self.store, since, until)

    def item_stats_via_sdk(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The same rows through `get_online_features` (the benchmark's naive per-request baseline)."""
        rows = online_rows(self.feature_store, F.ITEM_VIEW, item_ids)
        return {row[F.ITEM_KEY]: row for row in rows if row.get("views_7d") is not None}

    def covisitation(self) -> dict[str, bytes]:
        """Stored JSON per item, parsed lazily by the item cache (services/features/item_cache.py)."""
        return dict(self.store.scan(Namespace.COVISITATION))

    def popularity(self) -> dict[str, bytes]:
        return dict(self.store.scan(Namespace.POPULARITY))

    def persona_names(self) -> dict[int, str]:
        serving = self.models.serving_blob(ModelKind.PERSONAS)
        if serving is None:
            return {}
        data = orjson.loads(serving[1])
        return {int(p["persona_id"]): str(p.get("name_en", "")) for p in data.get("personas", [])}

    # -- models (stored by the one model registry, services/common/models.py) ----------------------------
    def save_model(
        self, model_text: bytes, meta: ModelMeta, embeddings: bytes | None = None, fusion: bytes | None = None
    ) -> None:
        """`embeddings`: the item embeddings learned with the ranker (ItemEmbeddings.to_bytes), if any;
        `fusion`: the candidate pool's learned cut (CandidateFusion.to_bytes), if any."""
        companions = {"embeddings": embeddings} if embeddings is not None else {}
        if fusion is not None:
            companions["fusion"] = fusion
        self.models.publish(
            ModelKind.RANKER, meta.version, model_text, meta.created_at, meta=meta.to_json(), companions=companions
        )

    def model_index(self) -> ModelIndex:
        return self.models.index(ModelKind.RANKER)

    def model_meta(self, version: str) -> ModelMeta | None:
        """The version's metadata, None when it is missing or unreadable (logged): one corrupt record must not
        hide the good models."""
        raw = self.models.metas(ModelKind.RANKER, [version])[0]
        if raw is None:
            return None
        try:
            return ModelMeta.from_json(raw)
        except Exception as exc:
            log.warning("skipping unreadable model metadata of %s: %s", version, type(exc).__name__)
            return None

    def model_text(self, version: str, index: ModelIndex | None = None) -> bytes | None:
        """The model text, checked against its published sha256 (DamagedModel when it does not match)."""
        return self.models.blob(ModelKind.RANKER, version, index)

    def model_embeddings(self, version: str) -> bytes | None:
        return self.models.companion(ModelKind.RANKER, version, "embeddings")

    def model_fusion(self, version: str) -> bytes | None:
        return self.models.companion(ModelKind.RANKER, version, "fusion")

    # -- recommendations and impressions --------------------------------------------------------------
    def save_recommendation(self, recommendation_id: str, record: Mapping[str, Any], ttl_s: int) -> None:
        self._write_records([(recommendation_id, record, ttl_s)], strict=True)

    def recommendation(self, recommendation_id: str) -> dict[str, Any] | None:
        raw = self.store.get(Namespace.RECOMMENDATIONS, recommendation_id)
        return orjson.loads(raw) if raw else None

    def log_events_async(self, events: list[Event | dict[str, Any]], record: RecordWrite | None = None) -> bool:
        """Queue impression events (and the recommendation record); False when the queue is full."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="impression-writer", daemon=True)
            self._writer.start()
        try:
            self._impressions.put_nowait((events, record))
            return True
        except queue.Full:
            return False

    def _write_loop(self) -> None:
        while not self._stop.is_set() or not self._impressions.empty():
            try:
                events, record = self._impressions.get(timeout=0.2)
            except queue.Empty:
                continue
            taken = 1
            batch = list(events)
            records = [record] if record else []
            while len(batch) < 2000:
                try:
                    more, more_record = self._impressions.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                batch.extend(more)
                if more_record:
                    records.append(more_record)
            try:
                # Re-checked at write time: a visitor erased (or refusing analytics) since the request was served
                # gets neither a recommendation record (it names them) nor impression events.
                refused = self._refusing_analytics(
                    [r[1].get("visitor_id") for r in records] + [_visitor(e) for e in batch]
                )
                self._write_records([r for r in records if r[1].get("visitor_id") not in refused])
                self._append_with_retry([e for e in batch if _visitor(e) not in refused])
            finally:
                for _ in range(taken):
                    self._impressions.task_done()

    def _refusing_analytics(self, visitor_ids: Sequence[Any]) -> set[str]:
        """Visitors whose consent record explicitly refuses `analytics` (an erasure's tombstone refuses every
        purpose). If consent cannot be read the writes go ahead: they would most likely fail the same way."""
        ids = sorted({v for v in visitor_ids if isinstance(v, str)})
        try:
            raws = self.store.get_many(Namespace.CONSENT, ids)
        except StorageUnavailable:
            return set()
        return {
            v
            for v, raw in zip(ids, raws, strict=True)
            if raw and Consent.from_bytes(raw).given.get("analytics") is False
        }

    def _write_records(self, records: Sequence[RecordWrite], strict: bool = False) -> None:
        """Records by id, and each visitor's record ids (erasure and export find a visitor's records by them
        instead of scanning). The ids go first: a failure in between leaves an id of no record, never a record
        no erasure finds. `strict` raises StorageUnavailable instead of logging the drop."""
        by_ttl: dict[int, dict[str, bytes]] = {}
        by_visitor: dict[int, dict[str, list[str]]] = {}
        for recommendation_id, record, ttl in records:
            by_ttl.setdefault(ttl, {})[recommendation_id] = orjson.dumps(record)
            visitor_id = record.get("visitor_id")
            if isinstance(visitor_id, str):
                by_visitor.setdefault(ttl, {}).setdefault(visitor_id, []).append(recommendation_id)
        for ttl, values in by_ttl.items():
            try:
                self.store.add_members(Namespace.RECOMMENDATIONS_BY_VISITOR, by_visitor.get(ttl, {}), ttl)
                self.store.put_many(Namespace.RECOMMENDATIONS, values, ttl)
            except StorageUnavailable:
                if strict:
                    raise
                log.warning("dropped %d recommendation records: the store is unavailable", len(values))

    def _append_with_retry(self, events: Iterable[Event | dict[str, Any]]) -> None:
        now = wall_time()  # when the log received it (freshness lag), not business time
        pending = [
            PendingEvent(e.event_id, e.visitor_id, envelope(e, now))
            if isinstance(e, Event)
            else PendingEvent(e["event_id"], e["visitor_id"], orjson.dumps({"at": now, "event": e}))
            for e in events
        ]
        for attempt in range(5):
            try:
                self.store.append_events(pending)
                return
            except StorageUnavailable:
                time.sleep(0.2 * (attempt + 1))
        log.warning("dropped %d impression events: the log stayed unavailable", len(pending))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until queued impressions are written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while (not self._impressions.empty() or self._impressions.unfinished_tasks) and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- training inputs ------------------------------------------------------------------------------
    def logged_events(self, batch: int = 20_000) -> Iterator[Event]:
        """Every event in the durable log, in log order across its partitions (streamed in batches)."""
        for entry in self.store.iter_log(batch):
            yield open_envelope(entry.payload)[1]

    def historical_visitor_rows(self, entity_df: pd.DataFrame, chunk: int = 100_000) -> pd.DataFrame:
        """Point-in-time visitor features and request-context features (Feast offline store, DuckDB).

        `entity_df` has visitor_id, event_timestamp and the request-context inputs of the on-demand view."""
        refs = F.visitor_feature_refs() + [f"{F.CONTEXT_VIEW}:{name}" for name in F.CONTEXT_FEATURES]
        return self._historical(entity_df, refs, chunk)

    def historical_item_stats(self, entity_df: pd.DataFrame, chunk: int = 100_000) -> pd.DataFrame:
        """Point-in-time item statistics for (item_id, event_timestamp) rows."""
        return self._historical(entity_df, F.item_feature_refs(), chunk)

    def _historical(self, entity_df: pd.DataFrame, refs: list[str], chunk: int) -> pd.DataFrame:
        # Chunks bound DuckDB's memory: one join of millions of rows can take many GB.
        parts = []
        for start in range(0, len(entity_df), chunk):
            part = entity_df.iloc[start : start + chunk]
            # Shared with other readers; compaction waits for it to swap files (one chunk at most).
            with offline_read_lock(self.offline_dir):
                parts.append(self.feature_store.get_historical_features(entity_df=part, features=refs).to_df())
        if not parts:
            return entity_df.iloc[0:0]
        return pd.concat(parts, ignore_index=True)


def _visitor(event: Event | Mapping[str, Any]) -> Any:
    return event.visitor_id if isinstance(event, Event) else event.get("visitor_id")
