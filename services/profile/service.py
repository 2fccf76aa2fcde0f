"""Profile service logic: batch ingestion into the durable log, and the aggregator that folds the log into
visitor/item state, candidate indexes and Feast feature rows."""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram

from services.common import features as F
from services.common.clock import SYSTEM_CLOCK, Clock, wall_time
from services.common.consent import Consent, ConsentDefaults, consent_changes_from_properties
from services.common.errors import StorageUnavailable
from services.common.events import Event, EventType, envelope, future_timestamp_error, not_after, open_envelope
from services.common.indexes import ContextPopularity, CoVisitation
from services.common.item_changes import ItemChangeRecorder
from services.common.storage import AppendResult, LogEntry, Namespace, PendingEvent
from services.common.traits import TraitSchema
from services.profile.aggregations import (
    DAY,
    HOUR,
    ItemInfo,
    ItemState,
    SegmentRules,
    VisitorState,
    fold_indexes,
    fold_item,
    fold_visitor,
    item_features,
    visitor_features,
)
from services.profile.commit import BatchCommit
from services.profile.lease import Lease
from services.profile.privacy import forget_profiles
from services.profile.repository import AGGREGATOR_CURSOR, ProfileRepository, index_dumps

log = logging.getLogger(__name__)

EVENTS_INGESTED = Counter("selaras_events_ingested_total", "Events acknowledged into the durable log", ["type"])
EVENTS_DUPLICATE = Counter("selaras_events_duplicate_total", "Re-sent events recognised by event_id")
EVENTS_REFUSED = Counter("selaras_events_refused_total", "Events refused, by reason", ["reason"])
EVENTS_AGGREGATED = Counter("selaras_events_aggregated_total", "Events folded into features")
FEATURE_WRITE_LAG = Histogram(
    "selaras_feature_write_lag_seconds",
    "Time from acknowledgement to the visitor's features being online",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
AGGREGATOR_BACKLOG = Gauge("selaras_aggregator_backlog_events", "Log entries not yet folded (last poll)")
AGGREGATOR_ERRORS = Counter("selaras_aggregator_errors_total", "Micro-batches that failed and will be retried")
AGGREGATOR_LAG = Gauge(
    "selaras_aggregator_lag_seconds", "How long the newest folded event waited, while a backlog remains (0: none)"
)
DEAD_LETTERS = Counter("selaras_aggregator_dead_letters_total", "Log entries set aside after failing to fold")
AGGREGATOR_DEAD_LETTERS = Gauge("selaras_aggregator_dead_letters_stored", "Log entries in the dead-letter list")
# A log entry that fails this many times to decode or fold is moved to the dead letters.
MAX_ATTEMPTS = 3

# The longest item window (30 days) plus a day: an item idle for longer has an all-zero row.
ITEM_WINDOW_S = 31 * DAY
# At start, items idle for longer than this are assumed to have been aged to zero by an earlier process.
AGE_AT_START_S = 90 * DAY

COUNT_FEATURES = tuple(name for name, kind in F.ITEM_FEATURES.items() if kind == "int")


class IngestService:
    def __init__(
        self,
        repository: ProfileRepository,
        clock: Clock = SYSTEM_CLOCK,
        max_skew_s: float = 300.0,
        traits: TraitSchema | None = None,
    ):
        self.repository = repository
        self.clock = clock
        self.max_skew_s = max_skew_s
        self.traits = traits or TraitSchema()

    def trait_errors(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        """`profile_update` properties the declared trait schema refuses, as errors by index and field (so a
        stored trait is always of its declared type)."""
        errors = [
            {"index": index, "field": f"properties.{name}", "message": message}
            for index, event in enumerate(events)
            if event.type is EventType.PROFILE_UPDATE
            for name, message in self.traits.errors(event.properties)
        ]
        if errors:
            EVENTS_REFUSED.labels("invalid_trait").inc(len({e["index"] for e in errors}))
        return errors

    def future_errors(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        """Events dated further ahead of the clock than the allowed skew, as errors by index and field."""
        now = self.clock.now()
        errors = []
        for index, event in enumerate(events):
            message = future_timestamp_error(event, now, self.max_skew_s)
            if message is not None:
                errors.append({"index": index, "field": "timestamp", "message": message})
        if errors:
            EVENTS_REFUSED.labels("future_timestamp").inc(len(errors))
        return errors

    def ingest(self, events: Sequence[Event]) -> AppendResult:
        """Append validated events to the durable log. Raises StorageUnavailable: nothing is acknowledged."""
        now = wall_time()  # when the log received it (the freshness metric), not business time
        pending = [PendingEvent(e.event_id, e.visitor_id, envelope(e, now)) for e in events]
        # An event id repeated inside one batch counts as a duplicate, like a re-sent one.
        try:
            result = self.repository.append(pending)
        except StorageUnavailable:
            EVENTS_REFUSED.labels("storage_unavailable").inc(len(events))
            raise
        accepted = set(result.accepted_ids)
        by_type: dict[str, int] = {}
        for event in events:
            if event.event_id in accepted:
                by_type[event.type.value] = by_type.get(event.type.value, 0) + 1
                accepted.discard(event.event_id)
        for kind, count in by_type.items():
            EVENTS_INGESTED.labels(kind).inc(count)
        if result.duplicates:
            EVENTS_DUPLICATE.inc(result.duplicates)
        return result


def position_key(position: str) -> tuple[int, int]:
    """Log positions ordered: Redis stream ids ("ms-seq") and SQLite row ids ("123")."""
    head, _, tail = position.partition("-")
    return int(head), int(tail or 0)


@dataclass
class BatchOutcome:
    events: int = 0
    visitors: int = 0
    items: int = 0
    lag_s: list[float] = field(default_factory=list)
    last_received_at: float = 0.0  # when the log acknowledged the batch's newest entry
    held: bool = True  # False: another process holds the log's lease, nothing was folded


class LeaseLost(Exception):
    """Another process took the log's lease while this one folded a batch: the batch is not committed."""


class EntryFailed(Exception):
    """One log entry could not be decoded or folded; the batch is retried and, after `max_attempts`, the
    entry is moved to the dead letters and the aggregator moves on."""

    def __init__(self, position: str, error: str):
        super().__init__(f"log entry {position}: {error}")
        self.position = position


class Aggregator:
    """Single consumer of the log. Reads are at-least-once; the effect is exactly-once: every state write of
    a batch goes through one commit record (`services/profile/commit.py`), feature rows are overwrites, and
    the caches take a batch's changes only after its writes succeeded."""

    def __init__(
        self,
        repository: ProfileRepository,
        rules: SegmentRules,
        consent_defaults: ConsentDefaults,
        offline_rows: bool = True,
        retention_s: int | None = None,
        persona_assigner: Callable[[Mapping[str, Any]], int] | None = None,
        observers: Sequence[Any] = (),
        clock: Clock = SYSTEM_CLOCK,
        max_skew_s: float = 300.0,
        log_name: str = AGGREGATOR_CURSOR,
        max_attempts: int = MAX_ATTEMPTS,
        lease: Lease | None = None,
    ):
        self.repository = repository
        # The log this aggregator folds: names its cursor, commit record, dead letters and status.
        self.log = log_name
        # Without a lease the caller guarantees a single consumer (tests, the demo world's own store).
        self.lease = lease
        self.max_attempts = max_attempts
        self._attempts: dict[str, int] = {}  # failures per log position (in memory: a restart starts over)
        self._errors: dict[str, str] = {}
        self._dead: set[str] = set()  # positions set aside in the batch being folded
        self.backlog = 0
        self.lag_s = 0.0
        self._reported_at = float("-inf")
        # Business time of the fold: windows of item rows are evaluated at the clock's now, and no event may
        # move an item's or visitor's time further ahead of it than `max_skew_s` (bulk imports of history pass
        # a DataClock that follows the events).
        self.clock = clock
        self.max_skew_s = max_skew_s
        self.rules = rules
        self.consent_defaults = consent_defaults
        self.offline_rows = offline_rows
        self.retention_s = retention_s
        self.persona_assigner = persona_assigner
        self.observers = list(observers)  # BatchObserver (services/profile/observers.py)
        self.catalog: dict[str, ItemInfo] = {}
        self._catalog_loaded_at = 0.0
        self.covisitation = CoVisitation()
        self.popularity = ContextPopularity()
        self._indexes_loaded = False
        self.item_cache: dict[str, ItemState] = {}
        self._item_digests: dict[str, int] = {}  # of each item's last written row: rewrite only what changed
        self._nonzero_rows: set[str] = set()  # items whose last written row counts something: to be aged
        self._aged_hour: int | None = None
        self.item_changes = ItemChangeRecorder(repository.store)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        # Held while a micro-batch is folded and written: erasure and consent withdrawal take it so that a
        # batch in flight cannot write back a profile they just deleted (reentrant: the fold itself withdraws).
        self.fold_lock = threading.RLock()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, batch_size: int, idle_s: float) -> None:
        self._thread = threading.Thread(target=self._loop, args=(batch_size, idle_s), name="aggregator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        if self.lease is not None:
            self.lease.release()  # a standby takes over at once instead of after the lease expires

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self, batch_size: int, idle_s: float) -> None:
        backoff = idle_s
        while not self._stop.is_set():
            try:
                with self.fold_lock:
                    outcome = self.run_once(batch_size)
                self.last_error = None
                backoff = idle_s
                if not outcome.held and self.lease is not None:
                    self._stop.wait(self.lease.ttl_s / 3)  # standby: try to take the lease now and then
                elif outcome.events == 0:
                    self._stop.wait(idle_s)
            except Exception as exc:  # keep consuming after Redis/Feast hiccups; the batch is retried
                AGGREGATOR_ERRORS.inc()
                self.last_error = type(exc).__name__
                log.warning("aggregator batch failed, retrying: %s", type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    # -- the fold -----------------------------------------------------------------------------------
    def refresh_catalog(self, force: bool = False) -> None:
        if force or time.monotonic() - self._catalog_loaded_at > 30:
            self.catalog = self.repository.catalog_info()
            self._catalog_loaded_at = time.monotonic()

    def run_once(self, batch_size: int) -> BatchOutcome:
        """Fold the next micro-batch of the log. On any error the in-memory caches are dropped (reloaded from
        the store on the next call), so a failed batch leaves no trace in memory and is folded again."""
        try:
            outcome = self._run_once(batch_size)
        except Exception as exc:
            self._discard_caches()
            self._report(error=type(exc).__name__)
            raise
        self._report()
        return outcome

    def _run_once(self, batch_size: int) -> BatchOutcome:
        if self.lease is not None:
            if not self.lease.hold():
                return BatchOutcome(held=False)
            if self.lease.acquired:  # another process may have folded since this one last did
                log.info("aggregator %s holds the lease of log %s", self.lease.holder, self.log)
                self._discard_caches()
        self._recover()
        if not self._indexes_loaded:
            self.covisitation, self.popularity = self.repository.load_indexes()
            self._indexes_loaded = True
        self.refresh_catalog()
        self.age_item_rows()
        cursor = self.repository.cursor(self.log)
        entries = self.repository.read_log(cursor, batch_size)
        if not entries:
            self.backlog, self.lag_s = 0, 0.0
            AGGREGATOR_BACKLOG.set(0)
            AGGREGATOR_LAG.set(0.0)
            return BatchOutcome()
        outcome = self.fold_entries(entries)
        # A full batch means more is waiting: the lag is then how long the newest folded event waited.
        self.backlog = batch_size if len(entries) == batch_size else 0
        self.lag_s = max(0.0, wall_time() - outcome.last_received_at) if self.backlog else 0.0
        AGGREGATOR_BACKLOG.set(self.backlog)
        AGGREGATOR_LAG.set(self.lag_s)
        return outcome

    def _discard_caches(self) -> None:
        """Forget everything held in memory that a failed batch may have changed; the store is the truth."""
        self.item_cache.clear()
        self._item_digests.clear()
        self._indexes_loaded = False
        self.covisitation, self.popularity = CoVisitation(), ContextPopularity()
        self._aged_hour = None  # the next sweep reloads recently active items

    def _decode(self, entries: Sequence[LogEntry]) -> list[tuple[str, float, Event]]:
        """Decode the entries. An entry that failed `max_attempts` times (here or in the fold) is set aside as
        a dead letter; one that failed fewer times fails the batch again (after a backoff)."""
        decoded: list[tuple[str, float, Event]] = []
        failed: list[EntryFailed] = []
        for entry in entries:
            if entry.position in self._dead:
                continue
            if self._attempts.get(entry.position, 0) >= self.max_attempts:
                self._dead_letter(entry)
                continue
            try:
                received_at, event = open_envelope(entry.payload)
            except Exception as exc:  # a schema rollback, a corrupt payload: deterministic, never transient
                failed.append(self._entry_failed(entry, exc))
                if self._attempts[entry.position] >= self.max_attempts:
                    self._dead_letter(entry)
                continue
            decoded.append((entry.position, received_at, event))
        retry = [error for error in failed if error.position not in self._dead]
        if retry:
            raise retry[0]
        return decoded

    def _entry_failed(self, entry: LogEntry, exc: Exception) -> EntryFailed:
        self._attempts[entry.position] = self._attempts.get(entry.position, 0) + 1
        self._errors[entry.position] = f"{type(exc).__name__}: {exc}"[:500]
        log.warning(
            "log entry %s failed (%d/%d): %s", entry.position, self._attempts[entry.position], self.max_attempts, exc
        )
        return EntryFailed(entry.position, self._errors[entry.position])

    def _dead_letter(self, entry: LogEntry) -> None:
        record = {
            "log": self.log,
            "position": entry.position,
            "attempts": self._attempts.get(entry.position, 0),
            "error": self._errors.get(entry.position, ""),
            "payload_b64": base64.b64encode(entry.payload).decode(),
            "at": wall_time(),
        }
        self.repository.save_dead_letter(self.log, entry.position, record)
        self._dead.add(entry.position)
        DEAD_LETTERS.inc()
        log.error("log entry %s moved to the dead letters after %d attempts", entry.position, record["attempts"])

    def fold_entries(self, entries: Sequence[LogEntry]) -> BatchOutcome:
        """Fold the entries and commit their effect exactly once (see `services/profile/commit.py`), then
        move the log's cursor past them. In-memory caches take the batch's changes only after that."""
        decoded = self._decode(entries)
        for _, _, event in decoded:
            self.clock.observe(event.ts)  # a DataClock (bulk import of history) follows the events
        latest_allowed = self.clock.now() + self.max_skew_s
        decoded = [(position, at, not_after(event, latest_allowed)) for position, at, event in decoded]
        visitor_ids = sorted({event.visitor_id for _, _, event in decoded})
        states = self.repository.visitor_states(visitor_ids)
        consents = self.repository.consents(visitor_ids)
        changed_consents: dict[str, Consent] = {}
        item_ids = sorted({event.item_id for _, _, event in decoded if event.item_id} - set(self.item_cache))
        if item_ids:
            self.item_cache.update(self.repository.item_states(item_ids))  # as stored: no batch's effect yet

        touched_visitors: dict[str, VisitorState] = {}
        touched_items: dict[str, ItemState] = {}
        offline: list[dict[str, Any]] = []
        received: dict[str, float] = {}
        for position, received_at, event in decoded:
            try:
                if event.type is EventType.PROFILE_UPDATE:
                    changes = consent_changes_from_properties(event.properties)
                    if changes:
                        merged = consents.get(event.visitor_id, Consent()).merged(changes, event.ts)
                        consents[event.visitor_id] = changed_consents[event.visitor_id] = merged
                self._fold_item_side(position, event, touched_items)
                consent = consents.get(event.visitor_id, Consent())
                if not consent.allows("personalization", self.consent_defaults):
                    continue  # no behavioural profile without consent (item statistics are anonymous)
                state = states.get(event.visitor_id) or VisitorState(event.visitor_id)
                if state.applied_position and position_key(position) <= position_key(state.applied_position):
                    continue  # folded before (a defence: the commit record already makes replays harmless)
                previous_items = list(state.recent_items)
                if not fold_visitor(state, event, self.catalog.get(event.item_id or "")):
                    continue
                state.applied_position = position
                states[event.visitor_id] = touched_visitors[event.visitor_id] = state
                received[event.visitor_id] = received_at
                fold_indexes(self.covisitation, self.popularity, event, state, previous_items)
                if self.offline_rows:
                    # Persona assignment (~0.1-0.3 ms) runs once per visitor and batch, for the online row; the
                    # history rows carry the persona known so far (the persona job re-assigns them nightly).
                    offline.append(self._row(state, event.ts, assign=False))
            except Exception as exc:  # this entry cannot be folded: after a few attempts it is set aside
                raise self._entry_failed(LogEntry(position, b""), exc) from exc

        # Consent changed in this batch, merged into the stored records first (compare-and-set, the later choice
        # per purpose wins): a choice made through the API while this batch ran is kept, and decides below.
        if changed_consents:
            changed_consents = self.repository.save_consents(changed_consents)
        # Personalization consent withdrawn in this batch: no profile is kept, the existing one is deleted below.
        withdrawn = sorted(
            v for v, c in changed_consents.items() if not c.allows("personalization", self.consent_defaults)
        )
        for visitor_id in withdrawn:
            touched_visitors.pop(visitor_id, None)
            received.pop(visitor_id, None)
        if withdrawn:
            offline = [row for row in offline if row[F.VISITOR_KEY] not in set(withdrawn)]
        online = [self._row(state, state.last_seen) for state in touched_visitors.values()]
        # Windows as of the clock (not the item's own last event: an item last sold months ago has sold nothing
        # in the last 7 days; `age_item_rows` keeps them so as time passes); stamped with that time.
        fold_now = max(self.clock.now(), max((s.last_ts for s in touched_items.values()), default=0.0))
        item_rows = self._item_rows(touched_items, fold_now)

        # 1. Feature rows: online rows are overwrites, offline part files are named after the batch's first
        #    position, so folding the batch again after a failure replaces them.
        part = f"{self.log}-{entries[0].position}"
        self.repository.write_visitor_rows(online, offline, part)
        self.repository.write_item_rows(item_rows, part)
        # 2. Every state write of the batch as one record, then applied (a failure from here on is repaired
        #    by applying the record again before the next batch).
        commit = BatchCommit(
            self.log,
            entries[0].position,
            entries[-1].position,
            {
                Namespace.VISITOR_STATE: {k: orjson.dumps(s) for k, s in touched_visitors.items()},
                Namespace.ITEM_STATE: {k: orjson.dumps(s) for k, s in touched_items.items()},
                **index_dumps(self.covisitation, self.popularity),
            },
            {Namespace.VISITOR_STATE: self.retention_s} if self.retention_s else {},
            {},  # consents were merged into the stored records above (compare-and-set): never overwritten here
            withdrawn,
            sorted(touched_items),
        )
        if self.lease is not None and not self.lease.hold():
            raise LeaseLost(f"the lease of log {self.log} expired during the batch")
        self.repository.save_commit_record(self.log, commit.to_bytes())
        self._finish(commit, [(position, event) for position, _, event in decoded])
        # 3. Only now the caches take the batch's changes; failures counted so far are behind the cursor.
        self._attempts.clear()
        self._errors.clear()
        self._dead.clear()
        self.item_cache.update(touched_items)
        self.covisitation.dirty.clear()
        self.popularity.dirty.clear()

        now = wall_time()
        lags = [now - at for at in received.values()]
        for lag in lags:
            FEATURE_WRITE_LAG.observe(lag)
        EVENTS_AGGREGATED.inc(len(entries))
        last_received = max((at for _, at, _ in decoded), default=now)
        return BatchOutcome(len(entries), len(touched_visitors), len(touched_items), lags, last_received)

    def _finish(self, commit: BatchCommit, batch: Sequence[tuple[str, Event]]) -> None:
        """Apply a commit record (idempotent), run the observers (idempotent per event), move the cursor,
        drop the record. Also the recovery path for a record a failed run left behind."""
        store = self.repository.store
        for namespace, values in commit.blobs.items():
            store.put_many(namespace, values, commit.ttl(namespace))
        if commit.consents:
            self.repository.save_consents({k: Consent.from_bytes(raw) for k, raw in commit.consents.items()})
        if commit.withdrawn:
            forget_profiles(store, self.repository.feature_store, commit.withdrawn)
        self.item_changes.record(commit.changed_items, wall_time())  # after the rows: a reader then finds them
        if self.observers and batch:
            for observer in self.observers:
                observer.observe(batch)
        self.repository.set_cursor(commit.last, self.log)
        self.repository.delete_commit_record(self.log)

    def _recover(self) -> None:
        """A commit record left by a failed or killed run: apply it before folding anything else."""
        raw = self.repository.commit_record(self.log)
        if raw is None:
            return
        commit = BatchCommit.from_bytes(raw)
        log.warning("re-applying the commit of log %s up to %s after a failure", self.log, commit.last)
        batch: list[tuple[str, Event]] = []  # the batch's events again, for the observers
        after = self.repository.cursor(self.log)
        last = position_key(commit.last)
        while entries := self.repository.read_log(after, 5000):
            for entry in entries:
                if position_key(entry.position) > last:
                    break
                try:
                    batch.append((entry.position, open_envelope(entry.payload)[1]))
                except Exception:
                    log.info("log entry %s skipped: set aside as a dead letter", entry.position)
            if position_key(entries[-1].position) >= last:
                break
            after = entries[-1].position
        self._finish(commit, batch)
        self._discard_caches()  # the store moved on under the caches

    def _report(self, error: str | None = None) -> None:
        """Publish the aggregator's status for readiness (any process) at most once a second."""
        self.last_error = error
        if self.lease is not None and not self.lease.held:
            return  # a standby: the holder reports for the log
        now = time.monotonic()
        if error is None and now - self._reported_at < 1.0:
            return
        self._reported_at = now
        status = {
            "log": self.log,
            "holder": self.lease.holder if self.lease is not None else None,
            "lag_s": round(self.lag_s, 3),
            "backlog": self.backlog,
            "error": error,
            "at": wall_time(),
        }
        try:
            self.repository.save_aggregator_status(self.log, status)
            AGGREGATOR_DEAD_LETTERS.set(self.repository.dead_letter_count())
        except StorageUnavailable:
            pass  # the store is down: readiness reports that itself

    def age_item_rows(self, force: bool = False) -> int:
        """Re-evaluate the windows of recently active items at the clock's now, once per clock hour; returns the
        number of rows rewritten.

        A row written when the item's last event was folded would otherwise keep that moment's "views in the
        last 24 hours" for ever, and an item last sold months ago would look hot. Only rows whose values changed
        are written (windows are hourly buckets; most items' do not move in a given hour). A clock that follows
        the data (bulk import) ages only when `force`d, once at the end: no time passes between its events."""
        if self.clock.follows_data and not force:
            return 0
        now = self.clock.now()
        hour = int(now // HOUR)
        if hour == self._aged_hour and not force:
            return 0
        if self._aged_hour is None:  # the first sweep also covers items folded before this process started
            for state in self.repository.all_item_states():
                if now - state.last_ts < AGE_AT_START_S:
                    self.item_cache.setdefault(state.item_id, state)
                    self._nonzero_rows.add(state.item_id)
        self._aged_hour = hour
        warm = {
            item_id: s
            for item_id, s in self.item_cache.items()
            if now - s.last_ts < ITEM_WINDOW_S or item_id in self._nonzero_rows
        }
        rows = self._item_rows(warm, now, only_changed=True)
        if rows:
            self.repository.write_item_rows(rows)
            self.item_changes.record([row[F.ITEM_KEY] for row in rows], wall_time())
        return len(rows)

    def _item_rows(
        self, states: Mapping[str, ItemState], at: float, only_changed: bool = False
    ) -> list[dict[str, Any]]:
        rows = []
        for item_id, state in states.items():
            features = item_features(state, at)
            digest = hash(tuple(tuple(v) if isinstance(v, list) else v for v in features.values()))
            if only_changed and self._item_digests.get(item_id) == digest:
                continue
            self._item_digests[item_id] = digest
            if any(features[name] for name in COUNT_FEATURES):
                self._nonzero_rows.add(item_id)
            else:
                self._nonzero_rows.discard(item_id)
            rows.append({F.ITEM_KEY: item_id, F.TIMESTAMP_FIELD: _utc(at), **features})
        return rows

    def _row(self, state: VisitorState, at: float, assign: bool = True) -> dict[str, Any]:
        row = visitor_features(state, self.rules, at)
        if assign and self.persona_assigner is not None and row["event_count"]:
            row["persona_id"] = self.persona_assigner(row)
            state.persona_id = row["persona_id"]
        row[F.VISITOR_KEY] = state.visitor_id
        row[F.TIMESTAMP_FIELD] = _utc(at)
        return row

    def _fold_item_side(self, position: str, event: Event, touched: dict[str, ItemState]) -> None:
        """Folds into the batch's own copy of the item state; the cache takes it after the commit."""
        if not event.item_id:
            return
        state = touched.get(event.item_id)
        if state is None:
            cached = self.item_cache.get(event.item_id)
            state = cached.copy() if cached else ItemState(event.item_id)
        applied = state.applied.get(self.log)
        if applied and position_key(position) <= position_key(applied):
            return  # already in the stored state
        if fold_item(state, event):
            state.applied[self.log] = position
            touched[event.item_id] = state


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
