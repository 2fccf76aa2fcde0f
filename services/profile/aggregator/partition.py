"""One partition of the log as an aggregator folds it: its bookkeeping (attempts, backlog, lag), the metrics
labelled by partition, the decoding of its entries with poison entries set aside as dead letters
(docs/data-path.md, "Poison entries and dead letters"), and the status it publishes for readiness."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from services.common.clock import wall_time
from services.common.errors import StorageUnavailable
from services.common.events import Event, open_envelope
from services.common.storage import LogEntry
from services.features.aggregations import ItemState
from services.profile.aggregator.commit import BatchCommit
from services.profile.aggregator.lease import Lease
from services.profile.repository import ProfileRepository

log = logging.getLogger(__name__)

EVENTS_AGGREGATED = Counter("selaras_events_aggregated_total", "Events folded into features")
FEATURE_WRITE_LAG = Histogram(
    "selaras_feature_write_lag_seconds",
    "Time from acknowledgement to the visitor's features being online",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# Per partition of the log: the label is the partition number (never a visitor id), bounded by the setting.
AGGREGATOR_BACKLOG = Gauge("selaras_aggregator_backlog_events", "Log entries not yet folded (last poll)", ["partition"])
AGGREGATOR_ERRORS = Counter("selaras_aggregator_errors_total", "Micro-batches that failed and will be retried")
AGGREGATOR_LAG = Gauge(
    "selaras_aggregator_lag_seconds",
    "How long the newest folded event waited, while a backlog remains (0: none)",
    ["partition"],
)
AGGREGATOR_PARTITIONS_HELD = Gauge("selaras_aggregator_partitions_held", "Log partitions this process folds")
DEAD_LETTERS = Counter(
    "selaras_aggregator_dead_letters_total", "Log entries set aside after failing to fold", ["partition"]
)
AGGREGATOR_DEAD_LETTERS = Gauge(
    "selaras_aggregator_dead_letters_stored", "Log entries in the dead-letter list", ["partition"]
)
# A log entry that fails this many times to decode or fold is moved to the dead letters.
MAX_ATTEMPTS = 3


@dataclass
class BatchOutcome:
    events: int = 0
    visitors: int = 0
    items: int = 0
    lag_s: list[float] = field(default_factory=list)
    last_received_at: float = 0.0  # when the log acknowledged the batch's newest entry
    held: bool = True  # False: another process holds the log's lease, nothing was folded


@dataclass
class Partition:
    """One partition of the log as an aggregator sees it: its lease and the bookkeeping of its fold."""

    number: int
    log: str  # names its cursor, lease, commit record, dead letters and status
    lease: Lease | None  # None: the caller guarantees a single consumer (tests, the demo world's own store)
    attempts: dict[str, int] = field(default_factory=dict)  # failures per position (in memory)
    errors: dict[str, str] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)  # positions set aside in the batch being folded
    backlog: int = 0
    lag_s: float = 0.0
    reported_at: float = float("-inf")

    @property
    def held(self) -> bool:
        return self.lease is None or self.lease.held


@dataclass
class Prepared:
    """A partition's batch folded as far as its saved commit record, waiting to be applied with the round's
    other batches (`Aggregator._finish_round`); or a record a failed run left, applied alone."""

    part: Partition
    commit: BatchCommit
    batch: list[tuple[str, Event]]  # the batch's events, for the observers
    item_shares: dict[str, ItemState] = field(default_factory=dict)  # the record's item shares as objects
    received: dict[str, float] = field(default_factory=dict)  # visitor -> when its newest event was logged
    events: int = 0
    visitors: int = 0
    last_received: float = 0.0


class LeaseLost(Exception):
    """Another process took the log's lease while this one folded a batch: the batch is not committed."""


class EntryFailed(Exception):
    """One log entry could not be decoded or folded; the batch is retried and, after `max_attempts`, the
    entry is moved to the dead letters and the aggregator moves on."""

    def __init__(self, position: str, error: str):
        super().__init__(f"log entry {position}: {error}")
        self.position = position


def decode_entries(
    repository: ProfileRepository, entries: Sequence[LogEntry], part: Partition, max_attempts: int
) -> list[tuple[str, float, Event]]:
    """Decode the entries. An entry that failed `max_attempts` times (here or in the fold) is set aside as
    a dead letter; one that failed fewer times fails the batch again (after a backoff)."""
    decoded: list[tuple[str, float, Event]] = []
    failed: list[EntryFailed] = []
    for entry in entries:
        if entry.position in part.dead:
            continue
        if part.attempts.get(entry.position, 0) >= max_attempts:
            dead_letter(repository, entry, part)
            continue
        try:
            received_at, event = open_envelope(entry.payload)
        except Exception as exc:  # a schema rollback, a corrupt payload: deterministic, never transient
            failed.append(entry_failed(entry, exc, part, max_attempts))
            if part.attempts[entry.position] >= max_attempts:
                dead_letter(repository, entry, part)
            continue
        decoded.append((entry.position, received_at, event))
    retry = [error for error in failed if error.position not in part.dead]
    if retry:
        raise retry[0]
    return decoded


def entry_failed(entry: LogEntry, exc: Exception, part: Partition, max_attempts: int = MAX_ATTEMPTS) -> EntryFailed:
    part.attempts[entry.position] = part.attempts.get(entry.position, 0) + 1
    part.errors[entry.position] = f"{type(exc).__name__}: {exc}"[:500]
    log.warning(
        "log %s entry %s failed (%d/%d): %s",
        part.log,
        entry.position,
        part.attempts[entry.position],
        max_attempts,
        exc,
    )
    return EntryFailed(entry.position, part.errors[entry.position])


def dead_letter(repository: ProfileRepository, entry: LogEntry, part: Partition) -> None:
    record = {
        "log": part.log,
        "position": entry.position,
        "attempts": part.attempts.get(entry.position, 0),
        "error": part.errors.get(entry.position, ""),
        "payload_b64": base64.b64encode(entry.payload).decode(),
        "at": wall_time(),
    }
    repository.save_dead_letter(part.log, entry.position, record)
    part.dead.add(entry.position)
    DEAD_LETTERS.labels(str(part.number)).inc()
    log.error("log entry %s moved to the dead letters after %d attempts", entry.position, record["attempts"])


def report_status(repository: ProfileRepository, part: Partition, holder: str, error: str | None = None) -> None:
    """Publish a partition's status for readiness (any process) at most once a second."""
    if not part.held:
        return  # another process holds it and reports for it
    now = time.monotonic()
    if error is None and now - part.reported_at < 1.0:
        return
    part.reported_at = now
    status = {
        "log": part.log,
        "partition": part.number,
        "holder": holder if part.lease is not None else None,
        "lag_s": round(part.lag_s, 3),
        "backlog": part.backlog,
        "error": error,
        "at": wall_time(),
    }
    try:
        repository.save_aggregator_status(part.log, status)
        counts = repository.dead_letter_counts()
        AGGREGATOR_DEAD_LETTERS.labels(str(part.number)).set(counts.get(part.log, 0))
    except StorageUnavailable:
        pass  # the store is down: readiness reports that itself
