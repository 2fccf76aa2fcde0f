"""The only privacy module that talks to storage: every place erasure, export and retention read or delete.

The store (the hot window of the event log and its idempotency keys, visitor state, consent, erasure marks,
recommendation records), the event archive (parquet under the offline store), Feast (the online row) and the
offline history (the visitor view's parquet part files). The holders at the end keep other modules' visitor
data (experiment state, message send history) and open their store per call: erasures are rare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast import FeatureStore

from services.common.consent import Consent, merge_into
from services.common.events import Event, open_envelope
from services.common.settings import CommonSettings
from services.common.storage import LogEntry, Namespace, Store, open_store
from services.features import schema as F
from services.features.aggregations import VisitorState
from services.features.store import (
    offline_parts,
    offline_parts_holding,
    offline_read_lock,
    online_rows,
    rewrite_offline_parts,
)
from services.profile.repository import forget_profiles, mark_erased

LOG_SCAN_BATCH = 5000


def visitor_marker(visitor_id: str) -> bytes:
    """The bytes every log envelope of the visitor contains (orjson writes no spaces)."""
    return b'"visitor_id":' + orjson.dumps(visitor_id)


class PrivacyRepository:
    def __init__(self, store: Store, feature_store: FeatureStore, offline_dir: Path):
        self.store = store
        self.feature_store = feature_store
        self.offline_dir = offline_dir.resolve()

    # -- the live profile ---------------------------------------------------------------------------
    def visitor_state(self, visitor_id: str) -> VisitorState | None:
        raw = self.store.get(Namespace.VISITOR_STATE, visitor_id)
        return VisitorState.from_dict(orjson.loads(raw)) if raw else None

    def consent(self, visitor_id: str) -> Consent | None:
        """The stored consent record (None when the visitor never gave or refused anything)."""
        raw = self.store.get(Namespace.CONSENT, visitor_id)
        return Consent.from_bytes(raw) if raw else None

    def online_features(self, visitor_id: str) -> dict[str, Any] | None:
        """The visitor's Feast online row without its key; None when Feast holds none."""
        row = online_rows(self.feature_store, F.VISITOR_VIEW, [visitor_id])[0]
        if row.get("event_count") is None:
            return None
        return {k: v for k, v in row.items() if k != F.VISITOR_KEY}

    def merge_consent(self, visitor_id: str, consent: Consent) -> None:
        """Merged into the stored record (compare-and-set): a newer explicit choice wins."""
        self.store.update(Namespace.CONSENT, visitor_id, merge_into(consent))

    def mark_erased(self, visitor_id: str, until: float | None) -> None:
        mark_erased(self.store, visitor_id, until)

    def forget_profiles(self, visitor_ids: Sequence[str]) -> tuple[int, int]:
        """Delete the live profile (state blob + online row): (states, online rows) deleted."""
        return forget_profiles(self.store, self.feature_store, visitor_ids)

    # -- the event log ------------------------------------------------------------------------------
    def visitor_events(self, visitor_id: str) -> Iterator[tuple[str, Event]]:
        """(position, event) of the visitor's logged events, oldest first: the archive of the visitor's partition
        (row groups that can hold the visitor), then that partition's hot window."""
        marker = visitor_marker(visitor_id)
        partition = self.store.partition_of(visitor_id)
        archive = self.store.archive
        archived: str | None = None
        entries: Iterable[LogEntry] = ()
        if archive is not None:
            archived = archive.archived_until(partition)
            entries = archive.visitor_entries(partition, visitor_id)
        for entry in itertools.chain(entries, self.store.iter_hot(partition, archived, LOG_SCAN_BATCH)):
            if marker in entry.payload:
                _, event = open_envelope(entry.payload)
                if event.visitor_id == visitor_id:
                    yield entry.position, event

    def delete_log_events(self, visitor_id: str) -> int:
        """Delete the visitor's events from the hot window; returns how many."""
        return self.store.delete_visitor_events(visitor_id, visitor_marker(visitor_id))

    def delete_archived_events(self, visitor_id: str) -> tuple[int, int]:
        """Delete the visitor's events from the archive: (events, files rewritten); (0, 0) without an archive."""
        if self.store.archive is None:
            return 0, 0
        return self.store.archive.delete_visitor(self.store.partition_of(visitor_id), visitor_id)

    def forget_event_ids(self, event_ids: Sequence[str], visitor_id: str) -> None:
        """Drop the idempotency keys of the visitor's events."""
        self.store.forget_event_ids(event_ids, visitor_id)

    def hot_log(self) -> Iterator[LogEntry]:
        """Every entry of the hot window, every partition."""
        return self.store.iter_hot_log(LOG_SCAN_BATCH)

    def delete_log_positions(self, partition: int, positions: Sequence[str]) -> int:
        return self.store.delete_events(positions, partition)

    def apply_archive_retention(self, cutoff: float, dry_run: bool) -> tuple[int, int]:
        """Archived events older than `cutoff`: (events, files rewritten); (0, 0) without an archive."""
        if self.store.archive is None:
            return 0, 0
        return self.store.archive.apply_retention(cutoff, dry_run)

    # -- recommendation records ---------------------------------------------------------------------
    def recommendation_records(self, visitor_id: str) -> dict[str, dict[str, Any]]:
        """The visitor's recommendation records by key, found through the visitor's set of record ids (what
        the recommend service writes with each record): never a scan of the store."""
        ids = sorted(self.store.members(Namespace.RECOMMENDATIONS_BY_VISITOR, visitor_id))
        found: dict[str, dict[str, Any]] = {}
        for key, raw in zip(ids, self.store.get_many(Namespace.RECOMMENDATIONS, ids), strict=True):
            if raw is not None:
                record = orjson.loads(raw)
                if record.get("visitor_id") == visitor_id:  # the exact check: ids are not secrets
                    found[key] = record
        return found

    def delete_recommendation_records(self, visitor_id: str, keys: Sequence[str]) -> int:
        """Delete the records and the visitor's set of record ids."""
        deleted = self.store.delete(Namespace.RECOMMENDATIONS, list(keys)) if keys else 0
        self.store.delete(Namespace.RECOMMENDATIONS_BY_VISITOR, [visitor_id])
        return deleted

    # -- the offline history ------------------------------------------------------------------------
    def offline_rows(self, visitor_id: str) -> list[dict[str, Any]]:
        """The visitor's rows of the offline history, oldest first: only the part files the index says hold
        the visitor are read."""
        rows: list[dict[str, Any]] = []
        with offline_read_lock(self.offline_dir):  # compaction swaps no file in between
            for path in offline_parts_holding(self.offline_dir, F.VISITOR_VIEW, visitor_id):
                try:
                    table = pq.read_table(path, filters=[(F.VISITOR_KEY, "=", visitor_id)])
                except FileNotFoundError:
                    continue  # deleted by an erasure or retention since the index was read: it was left empty
                rows.extend(table.to_pylist())
        rows.sort(key=lambda r: r[F.TIMESTAMP_FIELD])
        return rows

    def delete_offline_rows(self, visitor_id: str) -> tuple[int, int]:
        """Remove the visitor's rows from the offline history: (rows removed, files rewritten). Only the part
        files the index says hold the visitor are read and rewritten."""
        return self._purge_offline(
            lambda table: pc.not_equal(table[F.VISITOR_KEY], visitor_id), [F.VISITOR_KEY], visitor_id
        )

    def count_offline_rows_before(self, cutoff: datetime) -> int:
        count = 0
        with offline_read_lock(self.offline_dir):
            for path in offline_parts(self.offline_dir, F.VISITOR_VIEW):
                stamps = pq.read_table(path, columns=[F.TIMESTAMP_FIELD])[F.TIMESTAMP_FIELD]
                count += int(pc.sum(pc.less(stamps, pa.scalar(cutoff))).as_py() or 0)
        return count

    def delete_offline_rows_before(self, cutoff: datetime) -> tuple[int, int]:
        """Remove the offline rows stamped before `cutoff`: (rows removed, files rewritten)."""
        return self._purge_offline(
            lambda table: pc.greater_equal(table[F.TIMESTAMP_FIELD], pa.scalar(cutoff)), [F.TIMESTAMP_FIELD]
        )

    def _purge_offline(
        self, keep: Callable[[pa.Table], Any], columns: Sequence[str], visitor_id: str | None = None
    ) -> tuple[int, int]:
        """Drop the visitor-view rows where `keep` is false, in the files holding `visitor_id` when given, else
        in every file; returns (rows removed, files rewritten)."""
        removed = 0

        def transform(path: Path) -> pa.Table | None:
            nonlocal removed
            probe = pq.read_table(path, columns=list(columns))
            mask = keep(probe)
            kept = int(pc.sum(mask).as_py() or 0)
            if kept == probe.num_rows:
                return None
            removed += probe.num_rows - kept
            return pq.read_table(path).filter(mask)

        files = rewrite_offline_parts(self.offline_dir, F.VISITOR_VIEW, transform, key=visitor_id)
        return removed, files


# ------------------------------------------------------------------------------------ other holders


class ExperimentStateHolder:
    """Experiment per-visitor running values (services/experiments/store/), opened per call: erasure
    and export are rare, and this keeps the profile service free of another long-lived connection."""

    name = "experiment_state"

    def __init__(self, settings: CommonSettings):
        self.settings = settings

    @contextlib.contextmanager
    def _store(self) -> Iterator[Any]:
        from services.experiments.store import open_experiment_store

        store = open_experiment_store(self.settings)
        try:
            yield store
        finally:
            store.close()

    def forget_visitor(self, visitor_id: str) -> dict[str, int]:
        # Every experiment in the store, not only those running: a disabled or removed one keeps its records.
        with self._store() as store:
            erased = store.erase_visitor(visitor_id)
        return {"experiment_state": erased.running_values, "experiment_exposures": erased.exposure_records}

    def export_visitor(self, visitor_id: str) -> Any:
        with self._store() as store:
            # Every experiment holding the visitor's values, not only the running ones (as erasure does).
            heads = store.visitor_heads(store.visitor_experiments(visitor_id), [visitor_id])
            return {experiment: dataclasses.asdict(head) for (experiment, _), head in heads.items()}


class MessageHistoryHolder:
    """A visitor's send history (caps and cooldowns) for erasure and export
    (services/profile/privacy/service.py VisitorDataHolder). Opens the store per call: erasures are rare."""

    name = "message_history"

    def __init__(self, settings: CommonSettings):
        self.settings = settings

    def forget_visitor(self, visitor_id: str) -> int:
        store = open_store(self.settings)
        try:
            return store.delete(Namespace.MESSAGE_HISTORY, [visitor_id])
        finally:
            store.close()

    def export_visitor(self, visitor_id: str) -> Any:
        store = open_store(self.settings)
        try:
            raw = store.get(Namespace.MESSAGE_HISTORY, visitor_id)
        finally:
            store.close()
        if not raw:
            return None
        data = orjson.loads(raw)
        return {
            "sends": [{"send_at": s[0], "channel": s[1], "message": s[2]} for s in data.get("s", [])],
            "last_sent": data.get("t", {}),
        }


def index_recommendation_records(store: Store, ttl_s: int) -> int:
    """Add every stored recommendation record to its visitor's set of record ids: records written before the
    sets existed (an upgrade). Reads the whole namespace (on Redis a SCAN of the database): once, by `selaras
    admin index-recommendations`, never per request. `ttl_s`: the records' lifetime (the sets outlive them)."""
    by_visitor: dict[str, list[str]] = {}
    for key, raw in store.scan(Namespace.RECOMMENDATIONS):
        visitor_id = orjson.loads(raw).get("visitor_id")
        if isinstance(visitor_id, str):
            by_visitor.setdefault(visitor_id, []).append(key)
    store.add_members(Namespace.RECOMMENDATIONS_BY_VISITOR, by_visitor, ttl_s)
    return sum(len(ids) for ids in by_visitor.values())
