"""Erasure, export, consent withdrawal and retention of visitor data.

Where Selaras keeps data about a visitor (everything below is covered by `erase` and `export`):
  * the durable event log: the visitor's events in the hot window (the store) and in the event archive
    (parquet under the offline store), and their idempotency keys. Both are read for the visitor's own log
    partition only, and in the archive only the row groups that can hold the visitor, so the cost of an
    erasure or export grows with the visitor's data and the number of archive files, not with the log;
  * the aggregator's visitor state (store blob); the consent record is kept, every purpose refused as of the
    erasure (the proof of the request, and what stops the next visit or a late event from rebuilding a
    profile: the aggregator reads it before folding any batch);
  * the Feast online row (`visitor_features`) and the offline history (parquet part files that training
    reads point in time): rows are removed from the files, so a training set built afterwards never sees
    the visitor;
  * recommendation records (they name the visitor, kept 7 days for attribution);
  * holders registered by other modules: experiment per-visitor running values and exposure records (of
    every experiment the store holds, running or not), message send history.
Anonymous aggregates (item statistics, co-visitation, popularity, experiment sums) are not personal data
and stay. Logs never carry visitor ids, so there is nothing to erase there.

Ordering against the live aggregator: the consent tombstone is written first (no later batch folds the
visitor, whatever reaches the log afterwards), then the log is purged (exact visitor id of the parsed event),
then state and online row are deleted while holding the aggregator's fold lock. A micro-batch that read the
visitor's events before the tombstone has finished by then, so nothing is resurrected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast import FeatureStore
from prometheus_client import Counter

from services.common.clock import SYSTEM_CLOCK, Clock, wall_datetime, wall_time
from services.common.consent import Consent, ConsentDefaults, merge_into, refusing_all
from services.common.events import open_envelope
from services.common.settings import CommonSettings
from services.common.storage import LogEntry, Namespace, Store, open_store
from services.features import schema as F
from services.features.aggregations import VisitorState
from services.features.store import delete_online_entities, online_rows, rewrite_offline_parts
from services.profile.repository import mark_erased

log = logging.getLogger(__name__)

ERASURES = Counter("selaras_erasures_total", "Visitor erasure requests carried out")
PROFILES_WITHDRAWN = Counter(
    "selaras_profiles_withdrawn_total", "Behavioural profiles deleted because personalization consent was withdrawn"
)
RETENTION_DELETED = Counter("selaras_retention_deleted_total", "Records deleted by the retention job", ["kind"])
LOG_SCAN_BATCH = 5000


class VisitorDataHolder(Protocol):
    """Something else that keeps per-visitor data (experiment state, message caps...): erasure and export
    call it. `forget_visitor` returns how many records it deleted, or counts per place (the receipt lists
    them under those names)."""

    name: str

    def forget_visitor(self, visitor_id: str) -> int | Mapping[str, int]: ...

    def export_visitor(self, visitor_id: str) -> Any: ...


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


@dataclass
class ErasureReceipt:
    """What was deleted, per place. Counts only: the receipt never repeats the erased data."""

    visitor_id: str
    erased_at: str
    log_events: int = 0
    archived_events: int = 0
    archive_files_rewritten: int = 0
    idempotency_keys: int = 0
    visitor_state: int = 0
    consent: str = "kept_as_refused"  # the tombstone: every purpose refused as of the erasure
    online_rows: int = 0
    offline_rows: int = 0
    offline_files_rewritten: int = 0
    recommendation_records: int = 0
    holders: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RetentionReport:
    cutoff: str
    log_events: int = 0
    archived_events: int = 0
    archive_files_rewritten: int = 0
    offline_rows: int = 0
    offline_files_rewritten: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def visitor_marker(visitor_id: str) -> bytes:
    """The bytes every log envelope of the visitor contains (orjson writes no spaces)."""
    return b'"visitor_id":' + orjson.dumps(visitor_id)


def _json_safe(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


def forget_profiles(store: Store, feature_store: FeatureStore, visitor_ids: Sequence[str]) -> tuple[int, int]:
    """Delete the live behavioural profile (state blob + online row). Returns (states, online rows) deleted.

    The caller makes sure the aggregator is not folding these visitors at the same time (fold lock), or is
    the aggregator itself."""
    if not visitor_ids:
        return 0, 0
    states = store.delete(Namespace.VISITOR_STATE, list(visitor_ids))
    rows = delete_online_entities(feature_store, F.VISITOR_VIEW, list(visitor_ids))
    return states, rows


class PrivacyService:
    def __init__(
        self,
        store: Store,
        feature_store: FeatureStore,
        offline_dir: Path,
        consent_defaults: ConsentDefaults,
        fold_lock: contextlib.AbstractContextManager[Any] | None = None,
        holders: Sequence[VisitorDataHolder] = (),
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.store = store
        self.clock = clock
        self.feature_store = feature_store
        self.offline_dir = offline_dir.resolve()
        self.consent_defaults = consent_defaults
        self.fold_lock: contextlib.AbstractContextManager[Any] = fold_lock or contextlib.nullcontext()
        self.holders = list(holders)

    # -- what exists --------------------------------------------------------------------------------
    def known(self, visitor_id: str) -> bool:
        """Whether anything is kept about the visitor in the live stores (state, consent or online row)."""
        if self.store.get(Namespace.VISITOR_STATE, visitor_id) or self.store.get(Namespace.CONSENT, visitor_id):
            return True
        row = online_rows(self.feature_store, F.VISITOR_VIEW, [visitor_id])[0]
        return row.get("event_count") is not None

    def _log_entries(self, visitor_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(position, event as JSON) of the visitor's logged events, oldest first: the archive of the visitor's
        partition (row groups that can hold the visitor), then that partition's hot window."""
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
                    yield entry.position, event.model_dump(mode="json", exclude_none=True)

    def _offline_rows(self, visitor_id: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for path in sorted((self.offline_dir / F.VISITOR_VIEW).glob("*.parquet")):
            table = pq.read_table(path, filters=[(F.VISITOR_KEY, "=", visitor_id)])
            rows.extend(table.to_pylist())
        rows.sort(key=lambda r: r[F.TIMESTAMP_FIELD])
        return rows

    def _recommendation_records(self, visitor_id: str) -> dict[str, dict[str, Any]]:
        marker = visitor_marker(visitor_id)
        found: dict[str, dict[str, Any]] = {}
        for key, raw in self.store.scan(Namespace.RECOMMENDATIONS):
            if marker in raw:
                record = orjson.loads(raw)
                if record.get("visitor_id") == visitor_id:
                    found[key] = record
        return found

    # -- export -------------------------------------------------------------------------------------
    def export(self, visitor_id: str) -> dict[str, Any]:
        """Everything kept about the visitor, as JSON-ready data."""
        raw_state = self.store.get(Namespace.VISITOR_STATE, visitor_id)
        raw_consent = self.store.get(Namespace.CONSENT, visitor_id)
        consent = Consent.from_bytes(raw_consent)
        row = online_rows(self.feature_store, F.VISITOR_VIEW, [visitor_id])[0]
        online = {k: v for k, v in row.items() if k != F.VISITOR_KEY} if row.get("event_count") is not None else None
        state = dataclasses.asdict(VisitorState.from_dict(orjson.loads(raw_state))) if raw_state else None
        return _json_safe(
            {
                "visitor_id": visitor_id,
                "exported_at": wall_datetime().isoformat(),
                "consent": {
                    "given": dict(consent.given),
                    "updated_at": consent.updated_at or None,
                    "resolved": consent.resolved(self.consent_defaults),
                }
                if raw_consent
                else None,
                "profile_state": state,
                "online_features": online,
                "events": [event for _, event in self._log_entries(visitor_id)],
                "feature_history": self._offline_rows(visitor_id),
                "recommendations": self._recommendation_records(visitor_id),
                "other": {holder.name: holder.export_visitor(visitor_id) for holder in self.holders},
            }
        )

    # -- erasure ------------------------------------------------------------------------------------
    def erase(self, visitor_id: str) -> ErasureReceipt:
        """Remove the visitor everywhere (see the module docstring for the places and the ordering)."""
        started = time.perf_counter()
        receipt = ErasureReceipt(visitor_id, wall_datetime().isoformat())
        # The tombstone before anything else: from here on the aggregator folds nothing of the visitor (it reads
        # consent before each batch), so impressions still queued in a recommend process, or events re-sent
        # later, cannot rebuild the profile. Merged (compare-and-set) like any consent write: a newer explicit
        # choice wins.
        self.store.update(Namespace.CONSENT, visitor_id, merge_into(refusing_all(self.clock.now())))
        # An aggregator in another process may hold a commit record with this visitor's state: marked before
        # anything is deleted, so applying that record afterwards deletes the state again instead of restoring it.
        mark_erased(self.store, visitor_id, None)
        event_ids = [event["event_id"] for _, event in self._log_entries(visitor_id)]
        receipt.log_events = self.store.delete_visitor_events(visitor_id, visitor_marker(visitor_id))
        if self.store.archive is not None:
            # After the hot window: an archiver that read the visitor's entries before the mark has written its
            # file by the time this holds the partition's archive lock (or drops them: it checks the marks).
            receipt.archived_events, receipt.archive_files_rewritten = self.store.archive.delete_visitor(
                self.store.partition_of(visitor_id), visitor_id
            )
        if event_ids:
            self.store.forget_event_ids(event_ids, visitor_id)
        receipt.idempotency_keys = len(event_ids)
        with self.fold_lock:
            receipt.visitor_state, receipt.online_rows = forget_profiles(self.store, self.feature_store, [visitor_id])
        receipt.offline_rows, receipt.offline_files_rewritten = self._purge_offline(
            lambda table: pc.not_equal(table[F.VISITOR_KEY], visitor_id), [F.VISITOR_KEY]
        )
        mark_erased(self.store, visitor_id, wall_time())  # batches read from now on hold none of its events
        records = self._recommendation_records(visitor_id)
        receipt.recommendation_records = self.store.delete(Namespace.RECOMMENDATIONS, list(records)) if records else 0
        for holder in self.holders:
            removed = holder.forget_visitor(visitor_id)
            if isinstance(removed, Mapping):
                receipt.holders.update(removed)
            else:
                receipt.holders[holder.name] = removed
        receipt.seconds = round(time.perf_counter() - started, 3)
        ERASURES.inc()
        log.info(
            "erasure carried out: %d log events, %d archived events, %d offline rows, %d files rewritten",
            receipt.log_events,
            receipt.archived_events,
            receipt.offline_rows,
            receipt.offline_files_rewritten,
        )
        return receipt

    def _purge_offline(self, keep: Callable[[pa.Table], Any], columns: Sequence[str]) -> tuple[int, int]:
        """Drop the visitor-view rows where `keep` is false; returns (rows removed, files rewritten)."""
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

        files = rewrite_offline_parts(self.offline_dir, F.VISITOR_VIEW, transform)
        return removed, files

    # -- consent ------------------------------------------------------------------------------------
    def withdraw_profile(self, visitor_id: str) -> tuple[int, int]:
        """Personalization consent was withdrawn: delete the live profile, keep the consent record."""
        with self.fold_lock:
            deleted = forget_profiles(self.store, self.feature_store, [visitor_id])
        if any(deleted):
            PROFILES_WITHDRAWN.inc()
        return deleted

    # -- retention ----------------------------------------------------------------------------------
    def apply_retention(self, days: float, now: float | None = None, dry_run: bool = False) -> RetentionReport:
        """Delete logged events and offline feature rows older than `days` (by event time).

        Visitor state blobs expire on their own (TTL refreshed at each event); consent records are kept as
        the proof of what the visitor decided."""
        cutoff = (now if now is not None else self.clock.now()) - days * 86400.0
        cutoff_dt = datetime.fromtimestamp(cutoff, tz=UTC)
        report = RetentionReport(cutoff_dt.isoformat(), dry_run=dry_run)
        doomed: dict[int, list[str]] = {}  # partition -> positions
        for entry in self.store.iter_hot_log(LOG_SCAN_BATCH):
            if open_envelope(entry.payload)[1].ts < cutoff:
                doomed.setdefault(entry.partition, []).append(entry.position)
        report.log_events = sum(
            len(positions) if dry_run else self.store.delete_events(positions, partition)
            for partition, positions in doomed.items()
        )
        if self.store.archive is not None:
            report.archived_events, report.archive_files_rewritten = self.store.archive.apply_retention(cutoff, dry_run)
        if dry_run:
            for path in sorted((self.offline_dir / F.VISITOR_VIEW).glob("*.parquet")):
                stamps = pq.read_table(path, columns=[F.TIMESTAMP_FIELD])[F.TIMESTAMP_FIELD]
                report.offline_rows += int(pc.sum(pc.less(stamps, pa.scalar(cutoff_dt))).as_py() or 0)
        else:
            report.offline_rows, report.offline_files_rewritten = self._purge_offline(
                lambda table: pc.greater_equal(table[F.TIMESTAMP_FIELD], pa.scalar(cutoff_dt)), [F.TIMESTAMP_FIELD]
            )
            RETENTION_DELETED.labels("log_events").inc(report.log_events)
            RETENTION_DELETED.labels("archived_events").inc(report.archived_events)
            RETENTION_DELETED.labels("offline_rows").inc(report.offline_rows)
        return report


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


def privacy_holders(settings: CommonSettings) -> list[VisitorDataHolder]:
    """The other per-visitor data holders of this deployment: experiment state and message send history."""
    return [ExperimentStateHolder(settings), MessageHistoryHolder(settings)]
