"""The only module of the profile service that talks to storage (the store and Feast)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from feast import FeatureStore

from services.common.catalog import CatalogItem, ItemKind
from services.common.consent import Consent, merge_into
from services.common.settings import CommonSettings
from services.common.storage import (
    LOG_NAME,
    AppendResult,
    LogEntry,
    Namespace,
    PendingEvent,
    Store,
    open_store,
    partition_log,
    position_order,
    save_catalog,
)
from services.features import schema as F
from services.features.aggregations import ItemInfo, ItemState, VisitorState, merge_item_state
from services.features.indexes import ContextPopularity, CoVisitation
from services.features.store import (
    FeatureWriter,
    delete_online_entities,
    online_rows,
    open_feature_store,
    to_arrow_table,
)

log = logging.getLogger(__name__)
AGGREGATOR_CURSOR = LOG_NAME  # partition 0's log
# Longer than any batch stays in flight, so that its commit record cannot write an erased visitor back.
ERASURE_MARK_TTL_S = 7 * 24 * 3600


def _item_state(raw: bytes) -> ItemState:
    return ItemState.from_dict(orjson.loads(raw))


def _merge_item_state(stored: bytes | None, delta: bytes) -> bytes:
    return orjson.dumps(merge_item_state(_item_state(stored) if stored else None, _item_state(delta)))


# How one batch's share is added to each kind of shared record (the pure rules live next to their folds).
@dataclass(frozen=True)
class Share:
    """One batch's share of the records every partition adds to: from log `log` up to position `last`, the
    serialised deltas by key (and the item states as objects, when the folding process still holds them)."""

    log: str
    last: str
    deltas: Mapping[str, bytes]
    objects: Mapping[str, ItemState] | None = None

    def item_state(self, key: str) -> ItemState:
        return self.objects[key] if self.objects is not None and key in self.objects else _item_state(self.deltas[key])


SHARED_MERGES: dict[str, Callable[[bytes | None, bytes], bytes]] = {
    Namespace.ITEM_STATE: _merge_item_state,
    Namespace.COVISITATION: lambda stored, delta: CoVisitation.merge(stored, orjson.loads(delta)),
    Namespace.POPULARITY: lambda stored, delta: ContextPopularity.merge(stored, orjson.loads(delta)),
}


def mark_erased(store: Store, visitor_id: str, until: float | None) -> None:
    """An erasure in progress (`until` None) or finished at `until` (wall time): a commit record of a batch read
    before then must not write the visitor back (see `Aggregator._finish`). Keeps only the id, for a week."""
    store.put(Namespace.ERASED, visitor_id, orjson.dumps({"until": until}), ERASURE_MARK_TTL_S)


def erased_since(store: Store, visitor_ids: Sequence[str], read_at: float) -> list[str]:
    """The visitors whose erasure is in progress or ended at or after `read_at` (wall time): what was read of them
    at `read_at` must not be written back (the aggregator's batches, the persona job's rows)."""
    found = []
    for visitor_id, raw in zip(visitor_ids, store.get_many(Namespace.ERASED, visitor_ids), strict=True):
        if raw is not None:
            until = orjson.loads(raw)["until"]
            if until is None or read_at <= until:
                found.append(visitor_id)
    return found


def forget_profiles(store: Store, feature_store: FeatureStore, visitor_ids: Sequence[str]) -> tuple[int, int]:
    """Delete the live behavioural profile (state blob + online row). Returns (states, online rows) deleted.

    The caller makes sure the aggregator is not folding these visitors at the same time (fold lock), or is
    the aggregator itself."""
    if not visitor_ids:
        return 0, 0
    states = store.delete(Namespace.VISITOR_STATE, list(visitor_ids))
    rows = delete_online_entities(feature_store, F.VISITOR_VIEW, list(visitor_ids))
    return states, rows


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

    def read_log(self, after: str | None, limit: int, partition: int = 0) -> list[LogEntry]:
        return self.store.read_events(after, limit, partition)

    @property
    def partitions(self) -> int:
        return self.store.partitions

    def unfolded_partitions(self) -> list[int]:
        """Partitions with entries after their cursor (a batch still to fold)."""
        return [p for p in range(self.store.partitions) if self.read_log(self.cursor(partition_log(p)), 1, p)]

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

    def merge_shared(self, namespace: str, log: str, last: str, deltas: Mapping[str, bytes]) -> dict[str, bytes]:
        """Add one batch's share (`deltas`, from log `log` up to position `last`) to records every partition
        adds to: item statistics and candidate indexes. Each record's applied marker holds, per log, the last
        position added, so a batch applied again adds nothing; a concurrent writer's change is re-read and
        merged into (compare-and-set). Returns the records as stored."""
        return self.merge_shared_round(namespace, [Share(log, last, deltas)])

    def merge_shared_round(self, namespace: str, shares: Sequence[Share]) -> dict[str, bytes]:
        """`merge_shared` of several batches at once (one per log: the partitions one process folds in a
        round): each record is read, changed and written once for all of them, each log's share added unless
        its marker says it is in already."""
        merge = SHARED_MERGES[namespace]

        def add(key: str, value: bytes | None, pending: Sequence[Share]) -> bytes:
            merged = value
            for share in pending:
                merged = merge(merged, share.deltas[key])
            assert merged is not None
            return merged

        return self._merge_applied(namespace, shares, add)

    def merge_item_states(
        self, log: str, last: str, deltas: Mapping[str, bytes], shares: Mapping[str, ItemState] | None = None
    ) -> dict[str, ItemState]:
        """`merge_shared` of item statistics, returning the merged states as objects (see `merge_item_states_round`).
        `shares`: the batch's shares as objects when the caller still holds them (else parsed)."""
        return self.merge_item_states_round([Share(log, last, deltas, shares)])

    def merge_item_states_round(self, shares: Sequence[Share]) -> dict[str, ItemState]:
        """`merge_shared_round` of item statistics, returning the merged states as objects: the aggregator writes
        the items' rows from them (parsing them back from the JSON just written cost ~4% of a fold, cProfile)."""
        merged: dict[str, ItemState] = {}

        def add(key: str, value: bytes | None, pending: Sequence[Share]) -> bytes:
            state = _item_state(value) if value else None
            for share in pending:
                state = merge_item_state(state, share.item_state(key))
            assert state is not None
            merged[key] = state  # the last attempt's state is the stored one (a retry overwrites it)
            return orjson.dumps(state)

        stored = self._merge_applied(Namespace.ITEM_STATE, shares, add, merged.pop)
        # Records every share had reached already (applied before a failure) were not merged here: as stored.
        return {key: merged[key] if key in merged else _item_state(raw) for key, raw in stored.items()}

    def _merge_applied(
        self,
        namespace: str,
        shares: Sequence[Share],
        add: Callable[[str, bytes | None, Sequence[Share]], bytes],
        skipped: Callable[[str, Any], Any] | None = None,
    ) -> dict[str, bytes]:
        """`merge_many` with the applied markers: `add(key, stored value, shares to add)` is the new value;
        `skipped(key, None)` hears of a key every share is in already (re-read after a concurrent write, or
        applied before)."""
        if len({share.log for share in shares}) != len(shares):
            raise ValueError("one share per log and merge: a log's marker holds one position")

        def change(key: str, value: bytes | None, marker: bytes | None) -> tuple[bytes, bytes] | None:
            applied: dict[str, str] = orjson.loads(marker) if marker else {}
            pending = []
            for share in shares:
                if key not in share.deltas:
                    continue
                done = applied.get(share.log)
                if done is None or position_order(done) < position_order(share.last):
                    pending.append(share)
                    applied[share.log] = share.last
            if not pending:
                if skipped is not None:
                    skipped(key, None)
                return None
            return add(key, value, pending), orjson.dumps(applied)

        keys = dict.fromkeys(key for share in shares for key in share.deltas)
        stored = self.store.merge_many(namespace, list(keys), change)
        return {key: value for key, value in stored.items() if value is not None}

    # -- erasure against a batch in flight in another process ----------------------------------------
    def mark_erased(self, visitor_id: str, until: float | None) -> None:
        mark_erased(self.store, visitor_id, until)

    def forget_profiles(self, visitor_ids: Sequence[str]) -> tuple[int, int]:
        """Delete the visitors' live profiles (consent withdrawn or erased): (states, online rows) deleted."""
        return forget_profiles(self.store, self.feature_store, visitor_ids)

    def forget_history_rows(self, part: str, visitor_ids: Sequence[str]) -> int:
        """Remove the visitors' rows from the offline part file `write_visitor_rows` wrote as `part`; returns how
        many. For visitors erased while that batch was in flight: the erasure rewrote the files holding them, but
        maybe before this part was written."""
        return self.writer.remove_offline_rows(F.VISITOR_VIEW, part, visitor_ids)

    def erased_since(self, visitor_ids: Sequence[str], read_at: float) -> list[str]:
        """Visitors erased while or after a batch read at `read_at` was in flight."""
        return erased_since(self.store, visitor_ids, read_at)

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

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters per log (partition); keys are "<log>:<position>"."""
        counts: dict[str, int] = {}
        for key, _ in self.store.scan(Namespace.DEAD_LETTERS):
            log_name = key.rsplit(":", 1)[0]
            counts[log_name] = counts.get(log_name, 0) + 1
        return counts

    def join_aggregators(self, holder: str, ttl_s: float) -> int:
        """Announce this aggregator process (expires unless renewed); returns how many are alive, so that each
        takes its share of the partitions."""
        self.store.put(Namespace.AGGREGATOR_MEMBERS, holder, b"1", max(1, math.ceil(ttl_s)))
        # A scan, not `count`: it skips (and forgets) members that expired, i.e. processes that died.
        return max(1, sum(1 for _ in self.store.scan(Namespace.AGGREGATOR_MEMBERS)))

    def leave_aggregators(self, holder: str) -> None:
        self.store.delete(Namespace.AGGREGATOR_MEMBERS, [holder])

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
            table = to_arrow_table(last_row_per_moment(offline), F.VISITOR_KEY, F.VISITOR_FEATURES)
            self.writer.append_offline(F.VISITOR_VIEW, table, part)

    def write_item_rows(self, rows: Sequence[Mapping[str, Any]], part: str | None = None) -> None:
        self.writer.write(F.ITEM_VIEW, rows, offline=True, part=part)

    def online_visitor(self, visitor_id: str) -> dict[str, Any]:
        return online_rows(self.feature_store, F.VISITOR_VIEW, [visitor_id])[0]


def last_row_per_moment(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One history row per visitor and moment, the state after every event at that moment (rows come in fold
    order). Events often share a timestamp (a view and its cart, a batch sent at once); with one row each,
    Feast's point-in-time join picked any of them, and training on the same log gave a different model from
    run to run."""
    latest: dict[tuple[Any, Any], Mapping[str, Any]] = {}
    for row in rows:
        latest[(row[F.VISITOR_KEY], row[F.TIMESTAMP_FIELD])] = row
    return list(latest.values())
