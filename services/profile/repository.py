"""The only module of the profile service that talks to storage (the store and Feast)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
from feast import FeatureStore

from services.common import features as F
from services.common.catalog import CatalogItem, ItemKind
from services.common.consent import Consent, merge_into
from services.common.feature_store import FeatureWriter, online_rows, open_feature_store, to_arrow_table
from services.common.indexes import ContextPopularity, CoVisitation
from services.common.settings import CommonSettings
from services.common.storage import AppendResult, LogEntry, Namespace, PendingEvent, Store, open_store, save_catalog
from services.profile.aggregations import ItemInfo, ItemState, VisitorState

log = logging.getLogger(__name__)
AGGREGATOR_CURSOR = "aggregator"


class ProfileRepository:
    def __init__(self, store: Store, feature_store: FeatureStore, writer: FeatureWriter):
        self.store = store
        self.feature_store = feature_store
        self.writer = writer

    @classmethod
    def open(cls, settings: CommonSettings) -> ProfileRepository:
        store = open_store(settings)
        feature_store = open_feature_store(settings)
        return cls(store, feature_store, FeatureWriter(feature_store, settings.offline_dir))

    def close(self) -> None:
        self.store.close()

    # -- log --------------------------------------------------------------------------------------
    def append(self, events: Sequence[PendingEvent]) -> AppendResult:
        return self.store.append_events(events)

    def read_log(self, after: str | None, limit: int) -> list[LogEntry]:
        return self.store.read_events(after, limit)

    def cursor(self, name: str = AGGREGATOR_CURSOR) -> str | None:
        raw = self.store.get(Namespace.CURSOR, name)
        return raw.decode() if raw else None

    def set_cursor(self, position: str, name: str = AGGREGATOR_CURSOR) -> None:
        self.store.put(Namespace.CURSOR, name, position.encode())

    # -- state ------------------------------------------------------------------------------------
    def visitor_states(self, visitor_ids: Sequence[str]) -> dict[str, VisitorState]:
        raws = self.store.get_many(Namespace.VISITOR_STATE, visitor_ids)
        return {
            vid: VisitorState.from_dict(orjson.loads(raw)) for vid, raw in zip(visitor_ids, raws, strict=True) if raw
        }

    def iter_visitor_states(self, chunk: int = 1000) -> Iterator[list[VisitorState]]:
        """Every stored visitor state, in chunks (audiences, persona jobs): memory bounded by the chunk."""
        batch: list[VisitorState] = []
        for _, raw in self.store.scan(Namespace.VISITOR_STATE):
            batch.append(VisitorState.from_dict(orjson.loads(raw)))
            if len(batch) >= chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    def save_visitor_states(self, states: Mapping[str, VisitorState], ttl_s: int | None) -> None:
        self.store.put_many(Namespace.VISITOR_STATE, {k: orjson.dumps(s) for k, s in states.items()}, ttl_s)

    def item_states(self, item_ids: Sequence[str]) -> dict[str, ItemState]:
        raws = self.store.get_many(Namespace.ITEM_STATE, item_ids)
        return {iid: ItemState.from_dict(orjson.loads(raw)) for iid, raw in zip(item_ids, raws, strict=True) if raw}

    def all_item_states(self) -> Iterator[ItemState]:
        """Every stored item state (one pass over the item-state namespace)."""
        for _, raw in self.store.scan(Namespace.ITEM_STATE):
            yield ItemState.from_dict(orjson.loads(raw))

    def save_item_states(self, states: Mapping[str, ItemState]) -> None:
        self.store.put_many(Namespace.ITEM_STATE, {k: orjson.dumps(s) for k, s in states.items()})

    def consents(self, visitor_ids: Sequence[str]) -> dict[str, Consent]:
        raws = self.store.get_many(Namespace.CONSENT, visitor_ids)
        return {vid: Consent.from_bytes(raw) for vid, raw in zip(visitor_ids, raws, strict=True) if raw}

    def save_consents(self, consents: Mapping[str, Consent]) -> dict[str, Consent]:
        """Merge each record into the stored one (compare-and-set, per purpose the later choice wins) and
        return the records as stored: a concurrent writer's newer choice is kept, never overwritten."""
        stored: dict[str, Consent] = {}
        for visitor_id, consent in consents.items():
            raw = self.store.update(Namespace.CONSENT, visitor_id, merge_into(consent))
            stored[visitor_id] = Consent.from_bytes(raw)
        return stored

    # -- catalog and indexes ------------------------------------------------------------------------
    def upsert_catalog(self, items: Sequence[CatalogItem]) -> None:
        save_catalog(self.store, items)

    def catalog_info(self) -> dict[str, ItemInfo]:
        info: dict[str, ItemInfo] = {}
        for item_id, raw in self.store.scan(Namespace.CATALOG):
            item = CatalogItem.model_validate_json(raw)
            if item.kind is ItemKind.PRODUCT:
                info[item_id] = ItemInfo(item.category, item.brand, item.price, item.discount)
        return info

    def load_indexes(self) -> tuple[CoVisitation, ContextPopularity]:
        covisitation, popularity = CoVisitation(), ContextPopularity()
        for item_id, raw in self.store.scan(Namespace.COVISITATION):
            covisitation.load(item_id, raw)
        for key, raw in self.store.scan(Namespace.POPULARITY):
            popularity.load(key, raw)
        return covisitation, popularity

    def save_indexes(self, covisitation: CoVisitation, popularity: ContextPopularity) -> None:
        for namespace, values in index_dumps(covisitation, popularity).items():
            self.store.put_many(namespace, values)
        covisitation.dirty.clear()
        popularity.dirty.clear()

    # -- the aggregator's bookkeeping: commit records, dead letters, status -------------------------
    def commit_record(self, log: str) -> bytes | None:
        return self.store.get(Namespace.COMMIT, log)

    def save_commit_record(self, log: str, raw: bytes) -> None:
        self.store.put(Namespace.COMMIT, log, raw)

    def delete_commit_record(self, log: str) -> None:
        self.store.delete(Namespace.COMMIT, [log])

    def save_dead_letter(self, log: str, position: str, record: Mapping[str, Any]) -> None:
        self.store.put(Namespace.DEAD_LETTERS, f"{log}:{position}", orjson.dumps(record))

    def dead_letters(self) -> list[dict[str, Any]]:
        return [orjson.loads(raw) for _, raw in self.store.scan(Namespace.DEAD_LETTERS)]

    def dead_letter_count(self) -> int:
        return self.store.count(Namespace.DEAD_LETTERS)

    def save_aggregator_status(self, log: str, status: Mapping[str, Any]) -> None:
        self.store.put(Namespace.AGGREGATOR_STATUS, log, orjson.dumps(status))

    def aggregator_statuses(self) -> dict[str, dict[str, Any]]:
        return {log: orjson.loads(raw) for log, raw in self.store.scan(Namespace.AGGREGATOR_STATUS)}

    # -- features ---------------------------------------------------------------------------------
    def write_visitor_rows(
        self, online: Sequence[Mapping[str, Any]], offline: Sequence[Mapping[str, Any]], part: str | None = None
    ) -> None:
        """`part` names the offline part file so that writing a batch again replaces it (exactly-once)."""
        self.writer.write(F.VISITOR_VIEW, online, offline=False)
        if offline:
            table = to_arrow_table(offline, F.VISITOR_KEY, F.VISITOR_FEATURES)
            self.writer.append_offline(F.VISITOR_VIEW, table, part)

    def write_item_rows(self, rows: Sequence[Mapping[str, Any]], part: str | None = None) -> None:
        self.writer.write(F.ITEM_VIEW, rows, offline=True, part=part)

    def online_visitor(self, visitor_id: str) -> dict[str, Any]:
        return online_rows(self.feature_store, F.VISITOR_VIEW, [visitor_id])[0]


def index_dumps(covisitation: CoVisitation, popularity: ContextPopularity) -> dict[str, dict[str, bytes]]:
    """The stored form of the index entries changed since they were last saved (their `dirty` keys)."""
    return {
        Namespace.COVISITATION: {i: covisitation.dump(i) for i in covisitation.dirty},
        Namespace.POPULARITY: {k: popularity.dump(k) for k in popularity.dirty},
    }
