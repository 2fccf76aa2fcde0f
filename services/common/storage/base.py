"""The storage contract every backend implements: the event log (partitioned, idempotent appends), blobs by
namespace, compare-and-set updates and leases; the shared namespaces and catalog helpers."""

from __future__ import annotations

import heapq
import logging
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.common.clock import wall_time

if TYPE_CHECKING:
    from services.common.storage.archive import EventArchive

log = logging.getLogger(__name__)


# How long an event id is remembered by default (the idempotency of appends). `open_store` and
# `open_experiment_store` pass the hot window instead (`event_dedupe_ttl_s`): the keys expire with the events
# Redis keeps (docs/data-path.md, "Hot window and archive").
DEDUPE_TTL_S = 14 * 24 * 3600
APPEND_CHUNK = 500
# The log of partition 0 keeps the name (cursor, lease, commit record, status, stream key) of the single log
# that came before partitions, so a deployment that had one log keeps folding it.
LOG_NAME = "aggregator"


def partition_of(visitor_id: str, partitions: int) -> int:
    """The partition of a visitor's events: a stable hash (CRC-32 of the UTF-8 id), the same in every process
    and Python version (Python's `hash()` of a str is salted per process)."""
    if partitions <= 1:
        return 0
    return zlib.crc32(visitor_id.encode()) % partitions


def partition_log(partition: int) -> str:
    """The name of a partition's log: its cursor, lease, commit record, dead letters and status use it."""
    return LOG_NAME if partition == 0 else f"{LOG_NAME}-{partition}"


# Namespaces with too many short-lived keys to keep a key index for; scanning them uses SCAN (rare: erasure).
# "erased" holds visitor ids for a week: no index may keep them longer.
UNINDEXED_NAMESPACES = frozenset({"rec", "recvis", "itemchg", "erased"})  # never scanned; keys expire


def require_unindexed(namespace: str) -> None:
    """Member sets live in unindexed namespaces only: a namespace's scan reads values, not sets."""
    if namespace not in UNINDEXED_NAMESPACES:
        raise ValueError(f"member sets live in unindexed namespaces only, not {namespace!r}")


# (key, stored value or None, stored marker or None) -> (new value, new marker), or None: unchanged.
MergeChange = Callable[[str, bytes | None, bytes | None], tuple[bytes, bytes] | None]


def require_new_marker(key: str, marker: bytes | None, new: tuple[bytes, bytes]) -> None:
    """A merge must change the record's applied marker: stores detect a concurrent writer by it."""
    if new[1] == marker:
        raise ValueError(f"merge_many: the change of {key!r} left its applied marker as it was")


@dataclass(frozen=True)
class PendingEvent:
    event_id: str
    visitor_id: str
    payload: bytes


@dataclass(frozen=True)
class LogEntry:
    position: str
    payload: bytes
    partition: int = 0


@dataclass(frozen=True)
class AppendResult:
    accepted: int
    duplicates: int
    accepted_ids: tuple[str, ...]


class Store(ABC):
    """What both services need from durable storage. Every method raises StorageUnavailable on failure."""

    backend: str
    # The log is split in partitions by visitor (`partition_of`): one visitor's events stay in order in one
    # partition, and each partition is folded by one aggregator at a time (its own lease and cursor).
    partitions: int = 1
    # The archived history of the log (parquet under the offline store), when this deployment keeps one: the
    # log's readers (`iter_log`, `iter_partition`) read it before the hot window the store holds.
    archive: EventArchive | None = None

    # -- event log -------------------------------------------------------------------------------
    @abstractmethod
    def append_events(self, events: Sequence[PendingEvent]) -> AppendResult:
        """Atomically append the events whose ids were not seen before, each to its visitor's partition;
        durable when it returns."""

    @abstractmethod
    def read_events(self, after: str | None, limit: int, partition: int = 0) -> list[LogEntry]:
        """Entries of one partition strictly after `after` (None = from the start), oldest first."""

    @abstractmethod
    def log_length(self, partition: int | None = None) -> int:
        """Entries in one partition, or in all of them (None)."""

    @abstractmethod
    def delete_visitor_events(self, visitor_id: str, payload_marker: bytes) -> int:
        """Erasure: remove every logged event of the visitor (by its parsed visitor id; `payload_marker`, bytes
        every envelope of the visitor contains, only narrows the scan of the visitor's partition); returns how
        many."""

    @abstractmethod
    def forget_event_ids(self, event_ids: Sequence[str], visitor_id: str) -> None:
        """Drop the idempotency keys of one visitor's events (used by erasure so nothing of the visitor stays;
        the keys live in the visitor's partition)."""

    def delete_events(self, positions: Sequence[str], partition: int = 0) -> int:
        """Remove log entries of one partition by position (retention); returns how many existed."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete events by position")

    def partition_of(self, visitor_id: str) -> int:
        return partition_of(visitor_id, self.partitions)

    def trim_log(self, partition: int, last: str) -> int:
        """Remove the partition's entries up to and including `last` (archived and folded: the archiver alone
        calls this); returns how many."""
        raise NotImplementedError(f"{type(self).__name__} cannot trim its log")

    def log_time(self) -> float:
        """The clock that stamps log positions (seconds): the hot window is measured on it."""
        return wall_time()  # infrastructure time, like the embedded store's other stamps

    def iter_hot(self, partition: int, after: str | None = None, batch: int = 5000) -> Iterator[LogEntry]:
        """The entries of one partition the store holds (the hot window), after `after`, streamed in batches."""
        while entries := self.read_events(after, batch, partition):
            yield from entries
            after = entries[-1].position

    def iter_partition(self, partition: int, batch: int = 5000) -> Iterator[LogEntry]:
        """Every entry of one partition in log order: the archive, then the hot window after the last archived
        position (an entry archived but not trimmed yet, after an interrupted archive run, is read once)."""
        archived: str | None = None
        if self.archive is not None:
            archived = self.archive.archived_until(partition)
            yield from self.archive.entries(partition)
        yield from self.iter_hot(partition, archived, batch)

    def iter_log(self, batch: int = 5000) -> Iterator[LogEntry]:
        """Every entry of every partition (archive and hot window), merged by position (Redis stream ids start
        with the append time in ms: across partitions this is the order of arrival, to the millisecond),
        streamed: one archive file and one batch per partition in memory at a time."""
        return heapq.merge(
            *(self.iter_partition(p, batch) for p in range(self.partitions)), key=lambda e: position_order(e.position)
        )

    def iter_hot_log(self, batch: int = 5000) -> Iterator[LogEntry]:
        """Like `iter_log`, the hot window only."""
        return heapq.merge(
            *(self.iter_hot(p, None, batch) for p in range(self.partitions)), key=lambda e: position_order(e.position)
        )

    # -- blobs (namespaced key -> bytes, optional expiry) ------------------------------------------
    @abstractmethod
    def get_many(self, namespace: str, keys: Sequence[str]) -> list[bytes | None]: ...

    @abstractmethod
    def put_many(self, namespace: str, values: Mapping[str, bytes], ttl_s: int | None = None) -> None: ...

    @abstractmethod
    def delete(self, namespace: str, keys: Sequence[str]) -> int: ...

    @abstractmethod
    def update(
        self, namespace: str, key: str, change: Callable[[bytes | None], bytes], ttl_s: int | None = None
    ) -> bytes:
        """Compare-and-set: store `change(current value)` only if the value did not change in between (else
        read again and retry); returns what was stored. For records several writers merge (consent) and
        check-then-consume limits (message frequency caps). `ttl_s`: the stored value's expiry (None = none)."""

    @abstractmethod
    def merge_many(self, namespace: str, keys: Sequence[str], change: MergeChange) -> dict[str, bytes | None]:
        """Compare-and-set of many keys, each with an *applied marker* kept next to it (same transaction, same
        cluster slot; readers of the namespace never see it): `change(key, value, marker)` returns the new
        (value, marker), or None to leave the key as it is. A key another writer changed in between is read
        and changed again. Returns every key's value as stored afterwards. For shared records that several
        aggregator processes add to (item statistics, candidate indexes): the marker says what was added.
        Every change must change the marker (a change that leaves it as it was is refused with ValueError):
        the Redis store detects a concurrent writer by the marker alone. Write such records only through here."""

    @abstractmethod
    def scan(self, namespace: str) -> Iterator[tuple[str, bytes]]: ...

    # -- member sets (key -> set of strings, expiring): lookups that must not scan a namespace ------
    @abstractmethod
    def add_members(self, namespace: str, members: Mapping[str, Iterable[str]], ttl_s: int) -> None:
        """Add strings to each key's set; a member is kept at least `ttl_s` seconds after it was added (Redis
        renews the whole set's expiry). Only in unindexed namespaces: sets are found by key, never scanned.
        `delete` removes a set."""

    @abstractmethod
    def members(self, namespace: str, key: str) -> set[str]: ...

    # -- leases (a single consumer per log) ---------------------------------------------------------
    @abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease if it is free or expired, or renew it if `holder` has it; True when `holder` holds
        it for the next `ttl_s` seconds."""

    @abstractmethod
    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up, if `holder` has it (another holder's lease is left alone)."""

    @abstractmethod
    def lease_holder(self, name: str) -> str | None: ...

    def count(self, namespace: str) -> int:
        """How many keys the namespace holds (dead letters; small namespaces)."""
        return sum(1 for _ in self.scan(namespace))

    @abstractmethod
    def ping(self) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    def get(self, namespace: str, key: str) -> bytes | None:
        return self.get_many(namespace, [key])[0]

    def put(self, namespace: str, key: str, value: bytes, ttl_s: int | None = None) -> None:
        self.put_many(namespace, {key: value}, ttl_s)


def position_order(position: str) -> tuple[int, int]:
    """Log positions ordered: Redis stream ids ("ms-seq") and SQLite row ids ("123")."""
    head, _, tail = position.partition("-")
    return int(head), int(tail or 0)


# ------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------

# Keys 1..n are the idempotency keys, key n+1 the stream. ARGV: ttl, then (event_id, payload) pairs.
# One script call is atomic: either an id is new and its event is appended, or it is a duplicate.


class Namespace:
    """Blob namespaces shared by the services (the only cross-service storage contract besides Feast)."""

    VISITOR_STATE = "vstate"
    ITEM_STATE = "istate"
    COVISITATION = "covis"
    POPULARITY = "trend"
    CATALOG = "catalog"
    CURSOR = "cursor"
    CONSENT = "consent"
    PERSONAS = "personas"
    RECOMMENDATIONS = "rec"
    RECOMMENDATIONS_BY_VISITOR = "recvis"  # member sets: a visitor's recommendation ids (erasure, export)
    MESSAGE_HISTORY = "msgcap"  # sends per visitor: frequency caps and cooldowns
    ITEM_CHANGES = "itemchg"  # ids of items whose statistics changed, per time bucket (common/item_changes.py)
    META = "meta"
    MODELS = "models"  # trained models of every kind, their versions and the production pin (common/models.py)
    COMMIT = "commit"  # per log: the writes of the batch being committed (profile/commit.py)
    DEAD_LETTERS = "deadletter"  # log entries the aggregator could not fold, "<log>:<position>"
    AGGREGATOR_STATUS = "aggstatus"  # per log: cursor, lag, errors of its aggregator (readiness, metrics)
    AGGREGATOR_MEMBERS = "aggmember"  # live aggregator processes (expiring): each takes its share of partitions
    ERASED = "erased"  # visitors erased recently: a batch in flight must not write them back (expiring)
    REPORTS = "reports"  # HTML reports of the CLI's jobs (personas, evaluations), served at /reports/


CATALOG_VERSION_KEY = "catalog_version"
PARTITIONS_KEY = "log_partitions"  # meta: the partition count `selaras admin repartition` last set


def stored_partitions(store: Store) -> int | None:
    raw = store.get(Namespace.META, PARTITIONS_KEY)
    return int(raw) if raw else None


def check_log_partitions(store: Store) -> None:
    """At start: refuse a partition count other than the one the log was last repartitioned to."""
    stored = stored_partitions(store)
    if stored is not None and stored != store.partitions:
        raise RuntimeError(
            f"SELARAS_LOG_PARTITIONS is {store.partitions} but the log has {stored} partitions "
            "(set it to the stored count, or change it with `selaras admin repartition`)"
        )


def save_catalog(store: Store, items: Sequence[Any]) -> None:
    """Upsert catalog items (CatalogItem) and bump the catalog version, so item caches know to reload."""
    store.put_many(Namespace.CATALOG, {item.item_id: item.model_dump_json().encode() for item in items})
    bump_catalog_version(store)


def bump_catalog_version(store: Store) -> None:
    """After any catalog change: every item cache compares this and rebuilds when it moved."""
    store.put(Namespace.META, CATALOG_VERSION_KEY, str(time.time_ns()).encode())


def catalog_version(store: Store) -> bytes | None:
    return store.get(Namespace.META, CATALOG_VERSION_KEY)
