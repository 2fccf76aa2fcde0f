"""Profile service logic: batch ingestion into the durable log, and the aggregator that folds the log into
visitor/item state, candidate indexes and Feast feature rows."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.common import features as F
from services.common.clock import SYSTEM_CLOCK, Clock, wall_time
from services.common.consent import Consent, ConsentDefaults, consent_changes_from_properties
from services.common.errors import StorageUnavailable
from services.common.events import Event, EventType, envelope, future_timestamp_error, not_after, open_envelope
from services.common.indexes import ContextPopularity, CoVisitation
from services.common.item_changes import ItemChangeRecorder
from services.common.storage import AppendResult, LogEntry, PendingEvent
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
from services.profile.privacy import forget_profiles
from services.profile.repository import ProfileRepository

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

# The longest item window (30 days) plus a day: an item idle for longer has an all-zero row.
ITEM_WINDOW_S = 31 * DAY
# At start, items idle for longer than this are assumed to have been aged to zero by an earlier process.
AGE_AT_START_S = 90 * DAY

COUNT_FEATURES = tuple(name for name, kind in F.ITEM_FEATURES.items() if kind == "int")


class IngestService:
    def __init__(self, repository: ProfileRepository, clock: Clock = SYSTEM_CLOCK, max_skew_s: float = 300.0):
        self.repository = repository
        self.clock = clock
        self.max_skew_s = max_skew_s

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


class Aggregator:
    """Single consumer of the log. At-least-once: a visitor's state remembers the last position it folded,
    so a batch replayed after a crash does not count anything twice."""

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
    ):
        self.repository = repository
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
                if outcome.events == 0:
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
        if not self._indexes_loaded:
            self.covisitation, self.popularity = self.repository.load_indexes()
            self._indexes_loaded = True
        self.refresh_catalog()
        self.age_item_rows()
        cursor = self.repository.cursor()
        entries = self.repository.read_log(cursor, batch_size)
        if not entries:
            AGGREGATOR_BACKLOG.set(0)
            return BatchOutcome()
        outcome = self.fold_entries(entries)
        self.repository.set_cursor(entries[-1].position)
        if len(entries) == batch_size:
            AGGREGATOR_BACKLOG.set(batch_size)
        else:
            AGGREGATOR_BACKLOG.set(0)
        return outcome

    def fold_entries(self, entries: Sequence[LogEntry]) -> BatchOutcome:
        decoded = [(entry.position, *open_envelope(entry.payload)) for entry in entries]
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
            self.item_cache.update(self.repository.item_states(item_ids))

        touched_visitors: dict[str, VisitorState] = {}
        touched_items: dict[str, ItemState] = {}
        offline: list[dict[str, Any]] = []
        received: dict[str, float] = {}
        for position, received_at, event in decoded:
            if event.type is EventType.PROFILE_UPDATE:
                changes = consent_changes_from_properties(event.properties)
                if changes:
                    merged = consents.get(event.visitor_id, Consent()).merged(changes, event.ts)
                    consents[event.visitor_id] = changed_consents[event.visitor_id] = merged
            self._fold_item_side(event, touched_items)
            consent = consents.get(event.visitor_id, Consent())
            if not consent.allows("personalization", self.consent_defaults):
                continue  # no behavioural profile without consent (item statistics are anonymous)
            state = states.get(event.visitor_id) or VisitorState(event.visitor_id)
            if state.applied_position and position_key(position) <= position_key(state.applied_position):
                continue  # already folded before a crash: at-least-once delivery, exactly-once effect
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
        # Order matters for recovery: state and features first, the cursor last (in run_once).
        self.repository.write_visitor_rows(online, offline)
        self.repository.write_item_rows(item_rows)
        self.item_changes.record(touched_items, wall_time())  # after the rows: a reader then finds them
        self.repository.save_visitor_states(touched_visitors, self.retention_s)
        self.repository.save_item_states(touched_items)
        self.repository.save_indexes(self.covisitation, self.popularity)
        if withdrawn:
            forget_profiles(self.repository.store, self.repository.feature_store, withdrawn)
        if self.observers:
            pairs = [(position, event) for position, _, event in decoded]
            for observer in self.observers:
                observer.observe(pairs)
        now = wall_time()
        lags = [now - at for at in received.values()]
        for lag in lags:
            FEATURE_WRITE_LAG.observe(lag)
        EVENTS_AGGREGATED.inc(len(entries))
        return BatchOutcome(len(entries), len(touched_visitors), len(touched_items), lags)

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

    def _fold_item_side(self, event: Event, touched: dict[str, ItemState]) -> None:
        if not event.item_id:
            return
        state = self.item_cache.get(event.item_id) or ItemState(event.item_id)
        if fold_item(state, event):
            self.item_cache[event.item_id] = touched[event.item_id] = state


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
