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
visitor's events before the tombstone has finished by then, so nothing is resurrected. An aggregator in another
process checks the erasure mark when it applies a batch and deletes what it wrote of the visitor, the rows of the
batch's offline part file included (`Aggregator._finish`, docs/data-path.md).

Every place is read and deleted through `PrivacyRepository` (repository.py); this module holds the order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from prometheus_client import Counter

from services.common.clock import SYSTEM_CLOCK, Clock, wall_datetime, wall_time
from services.common.consent import ConsentDefaults, refusing_all
from services.common.events import open_envelope
from services.common.settings import CommonSettings
from services.profile.privacy.repository import ExperimentStateHolder, MessageHistoryHolder, PrivacyRepository

log = logging.getLogger(__name__)

ERASURES = Counter("selaras_erasures_total", "Visitor erasure requests carried out")
PROFILES_WITHDRAWN = Counter(
    "selaras_profiles_withdrawn_total", "Behavioural profiles deleted because personalization consent was withdrawn"
)
RETENTION_DELETED = Counter("selaras_retention_deleted_total", "Records deleted by the retention job", ["kind"])


class VisitorDataHolder(Protocol):
    """Something else that keeps per-visitor data (experiment state, message caps...): erasure and export
    call it. `forget_visitor` returns how many records it deleted, or counts per place (the receipt lists
    them under those names)."""

    name: str

    def forget_visitor(self, visitor_id: str) -> int | Mapping[str, int]: ...

    def export_visitor(self, visitor_id: str) -> Any: ...


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


class PrivacyService:
    def __init__(
        self,
        repository: PrivacyRepository,
        consent_defaults: ConsentDefaults,
        fold_lock: contextlib.AbstractContextManager[Any] | None = None,
        holders: Sequence[VisitorDataHolder] = (),
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.repository = repository
        self.clock = clock
        self.consent_defaults = consent_defaults
        self.fold_lock: contextlib.AbstractContextManager[Any] = fold_lock or contextlib.nullcontext()
        self.holders = list(holders)

    # -- what exists --------------------------------------------------------------------------------
    def known(self, visitor_id: str) -> bool:
        """Whether anything is kept about the visitor in the live stores (state, consent or online row)."""
        return (
            self.repository.visitor_state(visitor_id) is not None
            or self.repository.consent(visitor_id) is not None
            or self.repository.online_features(visitor_id) is not None
        )

    # -- export -------------------------------------------------------------------------------------
    def export(self, visitor_id: str) -> dict[str, Any]:
        """Everything kept about the visitor, as JSON-ready data."""
        state = self.repository.visitor_state(visitor_id)
        consent = self.repository.consent(visitor_id)
        return _json_safe(
            {
                "visitor_id": visitor_id,
                "exported_at": wall_datetime().isoformat(),
                "consent": {
                    "given": dict(consent.given),
                    "updated_at": consent.updated_at or None,
                    "resolved": consent.resolved(self.consent_defaults),
                }
                if consent is not None
                else None,
                "profile_state": dataclasses.asdict(state) if state is not None else None,
                "online_features": self.repository.online_features(visitor_id),
                "events": [
                    event.model_dump(mode="json", exclude_none=True)
                    for _, event in self.repository.visitor_events(visitor_id)
                ],
                "feature_history": self.repository.offline_rows(visitor_id),
                "recommendations": self.repository.recommendation_records(visitor_id),
                "other": {holder.name: holder.export_visitor(visitor_id) for holder in self.holders},
            }
        )

    # -- erasure ------------------------------------------------------------------------------------
    def erase(self, visitor_id: str) -> ErasureReceipt:
        """Remove the visitor everywhere (see the module docstring for the places and the ordering)."""
        started = time.perf_counter()
        receipt = ErasureReceipt(visitor_id, wall_datetime().isoformat())
        repository = self.repository
        # The tombstone before anything else: from here on the aggregator folds nothing of the visitor (it reads
        # consent before each batch), so impressions still queued in a recommend process, or events re-sent
        # later, cannot rebuild the profile. Merged (compare-and-set) like any consent write: a newer explicit
        # choice wins.
        repository.merge_consent(visitor_id, refusing_all(self.clock.now()))
        # An aggregator in another process may hold a commit record with this visitor's state: marked before
        # anything is deleted, so applying that record afterwards deletes the state again instead of restoring it.
        repository.mark_erased(visitor_id, None)
        event_ids = [event.event_id for _, event in repository.visitor_events(visitor_id)]
        receipt.log_events = repository.delete_log_events(visitor_id)
        # After the hot window: an archiver that read the visitor's entries before the mark has written its
        # file by the time this holds the partition's archive lock (or drops them: it checks the marks).
        receipt.archived_events, receipt.archive_files_rewritten = repository.delete_archived_events(visitor_id)
        if event_ids:
            repository.forget_event_ids(event_ids, visitor_id)
        receipt.idempotency_keys = len(event_ids)
        with self.fold_lock:
            receipt.visitor_state, receipt.online_rows = repository.forget_profiles([visitor_id])
        receipt.offline_rows, receipt.offline_files_rewritten = repository.delete_offline_rows(visitor_id)
        repository.mark_erased(visitor_id, wall_time())  # batches read from now on hold none of its events
        records = repository.recommendation_records(visitor_id)
        receipt.recommendation_records = repository.delete_recommendation_records(visitor_id, list(records))
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

    # -- consent ------------------------------------------------------------------------------------
    def withdraw_profile(self, visitor_id: str) -> tuple[int, int]:
        """Personalization consent was withdrawn: delete the live profile, keep the consent record."""
        with self.fold_lock:
            deleted = self.repository.forget_profiles([visitor_id])
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
        for entry in self.repository.hot_log():
            if open_envelope(entry.payload)[1].ts < cutoff:
                doomed.setdefault(entry.partition, []).append(entry.position)
        report.log_events = sum(
            len(positions) if dry_run else self.repository.delete_log_positions(partition, positions)
            for partition, positions in doomed.items()
        )
        report.archived_events, report.archive_files_rewritten = self.repository.apply_archive_retention(
            cutoff, dry_run
        )
        if dry_run:
            report.offline_rows = self.repository.count_offline_rows_before(cutoff_dt)
        else:
            report.offline_rows, report.offline_files_rewritten = self.repository.delete_offline_rows_before(cutoff_dt)
            RETENTION_DELETED.labels("log_events").inc(report.log_events)
            RETENTION_DELETED.labels("archived_events").inc(report.archived_events)
            RETENTION_DELETED.labels("offline_rows").inc(report.offline_rows)
        return report


def privacy_holders(settings: CommonSettings) -> list[VisitorDataHolder]:
    """The other per-visitor data holders of this deployment: experiment state and message send history."""
    return [ExperimentStateHolder(settings), MessageHistoryHolder(settings)]
