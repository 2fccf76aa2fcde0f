"""The aggregator: folds the (partitioned) event log into visitor/item state, candidate indexes and Feast
feature rows, exactly once in effect (docs/data-path.md). Ingestion into the log is `ingest.py`."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from services.common.clock import SYSTEM_CLOCK, Clock, wall_time
from services.common.consent import Consent, ConsentDefaults, consent_changes_from_properties
from services.common.errors import StorageUnavailable
from services.common.events import Event, EventType, not_after, open_envelope
from services.common.item_changes import ItemChangeRecorder
from services.common.storage import LogEntry, Namespace, partition_log, position_order
from services.features import schema as F
from services.features.aggregations import (
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
from services.features.indexes import ContextPopularity, CoVisitation
from services.profile.aggregator.commit import BatchCommit
from services.profile.aggregator.lease import Lease, holder_name
from services.profile.aggregator.partition import (
    AGGREGATOR_BACKLOG,
    AGGREGATOR_ERRORS,
    AGGREGATOR_LAG,
    AGGREGATOR_PARTITIONS_HELD,
    EVENTS_AGGREGATED,
    FEATURE_WRITE_LAG,
    MAX_ATTEMPTS,
    BatchOutcome,
    LeaseLost,
    Partition,
    Prepared,
    decode_entries,
    entry_failed,
    report_status,
)
from services.profile.repository import ProfileRepository, Share

log = logging.getLogger(__name__)

# The longest item window (30 days) plus a day: an item idle for longer has an all-zero row.
ITEM_WINDOW_S = 31 * DAY
# At start, items idle for longer than this are assumed to have been aged to zero by an earlier process.
AGE_AT_START_S = 90 * DAY

COUNT_FEATURES = tuple(name for name, kind in F.ITEM_FEATURES.items() if kind == "int")


class Aggregator:
    """Folds the partitions of the log it holds leases on (each partition has one consumer at a time; more
    processes share the partitions). Reads are at-least-once; the effect is exactly-once: every state write
    of a batch goes through one commit record (`services/profile/aggregator/commit.py`), feature rows are overwrites,
    and records all partitions add to (item statistics, candidate indexes) take each batch's share once,
    by compare-and-set with a per-partition applied marker (`ProfileRepository.merge_shared`)."""

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
        max_attempts: int = MAX_ATTEMPTS,
        lease_s: float | None = None,
        holder: str | None = None,
    ):
        self.repository = repository
        # With `lease_s` every partition is folded only under its lease, and this process takes its share of
        # the partitions (all of them / live aggregator processes). Without, the caller guarantees a single
        # consumer and this folds every partition.
        self.lease_s = lease_s
        self.holder = holder or holder_name()
        self.partitions = [
            Partition(
                number,
                partition_log(number),
                Lease(repository.store, partition_log(number), lease_s, self.holder) if lease_s else None,
            )
            for number in range(repository.partitions)
        ]
        self._balanced_at = float("-inf")
        self.max_attempts = max_attempts
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
        self.observers = list(observers)  # BatchObserver (services/profile/aggregator/observers.py)
        self.catalog: dict[str, ItemInfo] = {}
        self._catalog_loaded_at = 0.0
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
    def start(self, batch_size: int, idle_s: float, linger_s: float = 0.0) -> None:
        """Fold in a thread: every `idle_s` while the log is empty, `linger_s` after a batch that was not full
        (so that steady traffic is folded in batches, not event by event), at once while batches are full."""
        self._thread = threading.Thread(
            target=self._loop, args=(batch_size, idle_s, linger_s), name="aggregator", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        self.release()

    def release(self) -> None:
        """Give up every partition: another process takes them over at once instead of after the lease."""
        for part in self.partitions:
            if part.lease is not None:
                part.lease.release()
        if self.lease_s:
            with contextlib.suppress(StorageUnavailable):
                self.repository.leave_aggregators(self.holder)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def held_partitions(self) -> list[int]:
        return [part.number for part in self.partitions if part.held]

    @property
    def backlog(self) -> int:
        return sum(part.backlog for part in self.partitions if part.held)

    @property
    def lag_s(self) -> float:
        return max((part.lag_s for part in self.partitions if part.held), default=0.0)

    def _loop(self, batch_size: int, idle_s: float, linger_s: float = 0.0) -> None:
        backoff = idle_s
        while not self._stop.is_set():
            try:
                with self.fold_lock:
                    outcome = self.run_once(batch_size)
                self.last_error = None
                backoff = idle_s
                if not outcome.held and self.lease_s:
                    self._stop.wait(self.lease_s / 3)  # standby: try to take a lease now and then
                elif outcome.events == 0:
                    self._stop.wait(idle_s)
                elif linger_s and not self.backlog:
                    self._stop.wait(linger_s)  # caught up: let the next batch gather
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
        """Fold the next micro-batch of every partition this aggregator holds (taking its share of the free
        ones first). On any error the in-memory caches are dropped, so a failed batch leaves no trace in
        memory and is folded again."""
        self._balance()
        total = BatchOutcome(held=False)
        # Each held partition's batch is folded and its commit record saved; then the round's commits are
        # applied together, so records every partition adds to (item statistics, indexes) and item rows are
        # read, merged and written once per round rather than once per partition (`_finish_round`).
        prepared: list[Prepared] = []
        for part in self.partitions:
            if not part.held:
                continue
            try:
                self._renew_leases()  # every held lease, before each batch: a round over them takes a while
                if not part.held:
                    continue
                ready = self._prepare_partition(part, batch_size)
            except Exception as exc:
                self._failed(exc, [part])
                raise
            total.held = True
            if ready is None:
                self.last_error = None
                report_status(self.repository, part, self.holder)
            else:
                prepared.append(ready)
        if prepared:
            try:
                self._finish_round(prepared)
            except Exception as exc:
                self._failed(exc, [ready.part for ready in prepared])
                raise
            self.last_error = None
            for ready in prepared:
                outcome = self._completed(ready, batch_size)
                report_status(self.repository, ready.part, self.holder)
                total.events += outcome.events
                total.visitors += outcome.visitors
                total.items += outcome.items
                total.lag_s.extend(outcome.lag_s)
                total.last_received_at = max(total.last_received_at, outcome.last_received_at)
        AGGREGATOR_PARTITIONS_HELD.set(len(self.held_partitions()))
        if total.held:
            self.age_item_rows()
        return total

    def _failed(self, exc: Exception, parts: Sequence[Partition]) -> None:
        """A batch failed: forget what memory may hold of it (its commit record, if saved, is applied before the
        partition's next batch) and report the error."""
        self._discard_caches()
        self.last_error = type(exc).__name__
        for part in parts:
            report_status(self.repository, part, self.holder, error=self.last_error)

    def _balance(self) -> None:
        """Take this process's share of the partitions: announce it, count the live aggregator processes,
        give up partitions above the share (their next holder starts from what is stored), take free ones
        up to it. Every lease_s / 3; a process that dies stops renewing and its partitions become free."""
        if not self.lease_s or time.monotonic() - self._balanced_at < self.lease_s / 3:
            return
        self._balanced_at = time.monotonic()
        members = self.repository.join_aggregators(self.holder, self.lease_s)
        share = math.ceil(len(self.partitions) / members)
        held = [part for part in self.partitions if part.held]
        for part in held[share:]:
            assert part.lease is not None
            log.info("aggregator %s gives log %s up (share %d of %d)", self.holder, part.log, share, members)
            part.lease.release()
        for part in self.partitions:
            if len(self.held_partitions()) >= share:
                break
            if part.lease is not None and not part.held and part.lease.hold():
                log.info("aggregator %s holds the lease of log %s", self.holder, part.log)

    def _renew_leases(self) -> None:
        for part in self.partitions:
            if part.lease is not None and part.lease.held:
                part.lease.hold()

    def _prepare_partition(self, part: Partition, batch_size: int) -> Prepared | None:
        """The partition's next batch folded up to its saved commit record; None when its log is caught up."""
        self._recover(part)
        self.refresh_catalog()
        cursor = self.repository.cursor(part.log)
        read_at = wall_time()
        entries = self.repository.read_log(cursor, batch_size, part.number)
        if not entries:
            part.backlog, part.lag_s = 0, 0.0
            AGGREGATOR_BACKLOG.labels(str(part.number)).set(0)
            AGGREGATOR_LAG.labels(str(part.number)).set(0.0)
            return None
        return self._prepare(entries, part, read_at)

    def _completed(self, ready: Prepared, batch_size: int) -> BatchOutcome:
        """After the batch's commit was applied: its failures are behind the cursor; lag and metrics."""
        part = ready.part
        part.attempts.clear()
        part.errors.clear()
        part.dead.clear()
        now = wall_time()
        lags = [now - at for at in ready.received.values()]
        for lag in lags:
            FEATURE_WRITE_LAG.observe(lag)
        EVENTS_AGGREGATED.inc(ready.events)
        outcome = BatchOutcome(ready.events, ready.visitors, len(ready.item_shares), lags, ready.last_received)
        # A full batch means more is waiting: the lag is then how long the newest folded event waited.
        part.backlog = batch_size if ready.events == batch_size else 0
        part.lag_s = max(0.0, now - outcome.last_received_at) if part.backlog else 0.0
        AGGREGATOR_BACKLOG.labels(str(part.number)).set(part.backlog)
        AGGREGATOR_LAG.labels(str(part.number)).set(part.lag_s)
        return outcome

    def _discard_caches(self) -> None:
        """Forget everything held in memory that a failed batch may have changed; the store is the truth."""
        self._item_digests.clear()
        self._aged_hour = None  # the next sweep re-reads recently active items

    def _prepare(self, entries: Sequence[LogEntry], part: Partition, read_at: float) -> Prepared:
        """Fold the entries of one partition: visitor rows written, every other write saved as the batch's
        commit record (applied by `_finish_round`)."""
        decoded = decode_entries(self.repository, entries, part, self.max_attempts)
        for _, _, event in decoded:
            self.clock.observe(event.ts)  # a DataClock (bulk import of history) follows the events
        latest_allowed = self.clock.now() + self.max_skew_s
        decoded = [(position, at, not_after(event, latest_allowed)) for position, at, event in decoded]
        visitor_ids = sorted({event.visitor_id for _, _, event in decoded})
        states = self.repository.visitor_states(visitor_ids)
        consents = self.repository.consents(visitor_ids)
        changed_consents: dict[str, Consent] = {}

        # What this batch adds to the records all partitions share, folded into empty ones (merged at commit).
        covisitation, popularity = CoVisitation(), ContextPopularity()
        touched_visitors: dict[str, VisitorState] = {}
        touched_items: dict[str, ItemState] = {}
        offline: list[dict[str, Any]] = []
        last_rows: dict[str, tuple[float, dict[str, Any]]] = {}  # each visitor's newest history row (and its time)
        received: dict[str, float] = {}
        for position, received_at, event in decoded:
            try:
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
                if state.applied_position and position_order(position) <= position_order(state.applied_position):
                    continue  # folded before (a defence: the commit record already makes replays harmless)
                previous_items = list(state.recent_items)
                if not fold_visitor(state, event, self.catalog.get(event.item_id or "")):
                    continue
                state.applied_position = position
                states[event.visitor_id] = touched_visitors[event.visitor_id] = state
                received[event.visitor_id] = received_at
                fold_indexes(covisitation, popularity, event, state, previous_items)
                if self.offline_rows:
                    # Persona assignment (~0.1-0.3 ms) runs once per visitor and batch, for the online row; the
                    # history rows carry the persona known so far (the persona job re-assigns them nightly).
                    row = self._row(state, event.ts, assign=False)
                    offline.append(row)
                    last_rows[event.visitor_id] = (event.ts, row)
            except Exception as exc:  # this entry cannot be folded: after a few attempts it is set aside
                raise entry_failed(LogEntry(position, b""), exc, part, self.max_attempts) from exc

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
        online = [self._online_row(state, last_rows.get(visitor_id)) for visitor_id, state in touched_visitors.items()]

        # 1. Visitor feature rows (each visitor is in one partition: one writer): online rows are overwrites,
        #    offline part files are named after the batch's first position, so folding the batch again after
        #    a failure replaces them.
        self.repository.write_visitor_rows(online, offline, f"{part.log}-{entries[0].position}")
        # 2. Every state write of the batch as one record, then applied (a failure from here on is repaired
        #    by applying the record again before the next batch).
        commit = BatchCommit(
            part.log,
            entries[0].position,
            entries[-1].position,
            {Namespace.VISITOR_STATE: {k: orjson.dumps(s) for k, s in touched_visitors.items()}},
            {Namespace.VISITOR_STATE: self.retention_s} if self.retention_s else {},
            {},  # consents were merged into the stored records above (compare-and-set): never overwritten here
            withdrawn,
            sorted(touched_items),
            {
                Namespace.ITEM_STATE: {k: orjson.dumps(s) for k, s in touched_items.items()},
                Namespace.COVISITATION: {k: orjson.dumps(covisitation.neighbours[k]) for k in covisitation.dirty},
                Namespace.POPULARITY: {k: orjson.dumps(popularity.scores[k]) for k in popularity.dirty},
            },
            read_at,
        )
        if part.lease is not None and not part.lease.hold():
            raise LeaseLost(f"the lease of log {part.log} expired during the batch")
        self.repository.save_commit_record(part.log, commit.to_bytes())
        return Prepared(
            part,
            commit,
            [(position, event) for position, _, event in decoded],
            touched_items,
            received,
            len(entries),
            len(touched_visitors),
            max((at for _, at, _ in decoded), default=wall_time()),
        )

    def _finish_round(self, round_: Sequence[Prepared]) -> None:
        """Apply the round's commit records (each idempotent), run the observers (idempotent per event), move
        each cursor, drop each record. The records every partition adds to are merged once for the round: one
        read, change and compare-and-set per item or index key, each log's share added unless its marker has
        it already; item rows are written once. Also the recovery path, with one record a failed run left."""
        for ready in round_:
            self._apply_visitors(ready.commit)
        merged_items: dict[str, ItemState] = {}
        for namespace in (Namespace.ITEM_STATE, Namespace.COVISITATION, Namespace.POPULARITY):
            shares = [
                Share(ready.commit.log, ready.commit.last, ready.commit.merges[namespace], ready.item_shares)
                for ready in round_
                if ready.commit.merges.get(namespace)
            ]
            if not shares:
                continue
            if namespace == Namespace.ITEM_STATE:
                merged_items = self.repository.merge_item_states_round(shares)
            else:
                self.repository.merge_shared_round(namespace, shares)
        # Item rows from the merged states (every partition's events), windows as of the clock (an item last
        # sold months ago has sold nothing in the last 7 days; `age_item_rows` keeps them so as time passes).
        # Named after the round's first batch: folding the round again after a failure replaces the file.
        first = round_[0].commit
        fold_now = max(self.clock.now(), max((s.last_ts for s in merged_items.values()), default=0.0))
        self.repository.write_item_rows(self._item_rows(merged_items, fold_now), f"{first.log}-{first.first}")
        changed = sorted({item for ready in round_ for item in ready.commit.changed_items})
        self.item_changes.record(changed, wall_time())  # after the rows: a reader then finds them
        for ready in round_:
            if self.observers and ready.batch:
                for observer in self.observers:
                    observer.observe(ready.batch)
            self.repository.set_cursor(ready.commit.last, ready.commit.log)
            self.repository.delete_commit_record(ready.commit.log)

    def _apply_visitors(self, commit: BatchCommit) -> None:
        """The record's visitor writes, erasures since the batch was read respected."""
        store = self.repository.store
        visitors = commit.values(Namespace.VISITOR_STATE)
        # An erasure (in any process) since the batch was read wins: its visitors are not written back.
        erased = set(self.repository.erased_since(sorted(visitors), commit.read_at)) if visitors else set()
        for namespace, values in commit.blobs.items():
            kept = {k: v for k, v in values.items() if k not in erased}
            store.put_many(namespace, kept, commit.ttl(namespace))
        if commit.consents:
            self.repository.save_consents({k: Consent.from_bytes(raw) for k, raw in commit.consents.items()})
        # Checked again after the writes: an erasure that began after the check above deletes them itself, one
        # that began before the writes is seen now (it marks the visitor before it deletes anything).
        erased |= set(self.repository.erased_since(sorted(visitors), commit.read_at)) if visitors else set()
        if commit.withdrawn or erased:
            self.repository.forget_profiles(sorted(set(commit.withdrawn) | erased))
        if erased:
            # And from the batch's part file, written before these checks: an erasure that marked them later
            # finds the file itself (it is indexed), one that marked them earlier may have rewritten the files
            # holding them before this one existed.
            self.repository.forget_history_rows(f"{commit.log}-{commit.first}", sorted(erased))

    def _recover(self, part: Partition) -> None:
        """A commit record left by a failed or killed run: apply it before folding anything else."""
        raw = self.repository.commit_record(part.log)
        if raw is None:
            return
        commit = BatchCommit.from_bytes(raw)
        log.warning("re-applying the commit of log %s up to %s after a failure", part.log, commit.last)
        batch: list[tuple[str, Event]] = []  # the batch's events again, for the observers
        after = self.repository.cursor(part.log)
        last = position_order(commit.last)
        while entries := self.repository.read_log(after, 5000, part.number):
            for entry in entries:
                if position_order(entry.position) > last:
                    break
                try:
                    batch.append((entry.position, open_envelope(entry.payload)[1]))
                except Exception:
                    log.info("log entry %s skipped: set aside as a dead letter", entry.position)
            if position_order(entries[-1].position) >= last:
                break
            after = entries[-1].position
        self._finish_round([Prepared(part, commit, batch)])
        self._discard_caches()  # the store moved on under the caches

    def age_item_rows(self, force: bool = False) -> int:
        """Re-evaluate the windows of recently active items at the clock's now, once per clock hour; returns the
        number of rows rewritten.

        A row written when the item's last event was folded would otherwise keep that moment's "views in the
        last 24 hours" for ever, and an item last sold months ago would look hot. Only rows whose values changed
        are written (windows are hourly buckets; most items' do not move in a given hour). A clock that follows
        the data (bulk import) ages only when `force`d, once at the end: no time passes between its events."""
        if self.clock.follows_data and not force:
            return 0
        if not force and not self.partitions[0].held:
            return 0  # item rows are shared: the holder of partition 0 ages them
        now = self.clock.now()
        hour = int(now // HOUR)
        if hour == self._aged_hour and not force:
            return 0
        # Read from the store: other partitions' aggregators add to the same items. The first sweep also covers
        # items folded before this process started.
        horizon = AGE_AT_START_S if self._aged_hour is None else ITEM_WINDOW_S + DAY
        self._aged_hour = hour
        warm = {
            s.item_id: s
            for s in self.repository.all_item_states()
            if now - s.last_ts < horizon or s.item_id in self._nonzero_rows
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

    def _online_row(self, state: VisitorState, last_row: tuple[float, dict[str, Any]] | None) -> dict[str, Any]:
        """The visitor's online row: its state as of its latest event. The batch's newest history row of the
        visitor is that row already when it was taken at the latest event (every folded event leaves one, so
        nothing changed the state after it): a copy with the persona assigned, instead of computing the
        features again (a third of the fold's feature-row time, cProfile)."""
        if last_row is None or last_row[0] != state.last_seen:
            return self._row(state, state.last_seen)
        row = dict(last_row[1])
        if self.persona_assigner is not None and row["event_count"]:
            row["persona_id"] = state.persona_id = self.persona_assigner(row)
        return row

    def _row(self, state: VisitorState, at: float, assign: bool = True) -> dict[str, Any]:
        row = visitor_features(state, self.rules, at)
        if assign and self.persona_assigner is not None and row["event_count"]:
            row["persona_id"] = self.persona_assigner(row)
            state.persona_id = row["persona_id"]
        row[F.VISITOR_KEY] = state.visitor_id
        row[F.TIMESTAMP_FIELD] = _utc(at)
        return row

    @staticmethod
    def _fold_item_side(event: Event, touched: dict[str, ItemState]) -> None:
        """Folds into the batch's share of the item's statistics (an empty state), merged into the stored
        state at commit (`merge_item_state`): other partitions add to the same item meanwhile."""
        if not event.item_id:
            return
        state = touched.get(event.item_id) or ItemState(event.item_id)
        if fold_item(state, event):
            touched[event.item_id] = state


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
