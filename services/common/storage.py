"""Durable storage behind one small interface, with two backends.

- `RedisStore` (production): the event log is a Redis stream, idempotency keys and blobs are plain keys.
  Run Redis with `appendonly yes` and `appendfsync always` so an acknowledged event survives a restart.
- `SqliteStore` (embedded default): one SQLite file in WAL mode with `synchronous=FULL`.

Both services use it for the event log, visitor/item state, the catalog, candidate indexes and
recommendation records. Feast's online store is separate (see `feature_store.py`).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import sqlite3
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from services.common.clock import wall_time
from services.common.errors import StorageUnavailable
from services.common.events import envelope_visitor
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)

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
UNINDEXED_NAMESPACES = frozenset({"rec", "itemchg", "erased"})  # never scanned; keys expire


# (key, stored value or None, stored marker or None) -> (new value, new marker), or None: unchanged.
MergeChange = Callable[[str, bytes | None, bytes | None], tuple[bytes, bytes] | None]


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

    def iter_log(self, batch: int = 5000) -> Iterator[LogEntry]:
        """Every entry of every partition, merged by position (Redis stream ids start with the append time
        in ms: across partitions this is the order of arrival, to the millisecond), streamed in batches."""

        def one(partition: int) -> Iterator[LogEntry]:
            after: str | None = None
            while entries := self.read_events(after, batch, partition):
                yield from entries
                after = entries[-1].position

        return heapq.merge(*(one(p) for p in range(self.partitions)), key=lambda e: position_order(e.position))

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
        aggregator processes add to (item statistics, candidate indexes): the marker says what was added."""

    @abstractmethod
    def scan(self, namespace: str) -> Iterator[tuple[str, bytes]]: ...

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
_APPEND_SCRIPT = """
local ttl = tonumber(ARGV[1])
local n = #KEYS - 1
local stream = KEYS[#KEYS]
local accepted = {}
for i = 1, n do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    redis.call('XADD', stream, '*', 'e', ARGV[i + 1])
    accepted[#accepted + 1] = i
  end
end
return accepted
"""


# Take (SET NX PX) or renew (same holder: PEXPIRE) a lease in one atomic step.
_LEASE_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
# Compare-and-set of a value and its marker (KEYS: value, marker; one slot). ARGV: the SHA-1 of the value and
# of the marker as read ("" when absent), then the new value and marker. 1: written, 0: changed meanwhile.
_MERGE_SCRIPT = """
local value = redis.call('GET', KEYS[1])
local marker = redis.call('GET', KEYS[2])
local value_sha = value and redis.sha1hex(value) or ''
local marker_sha = marker and redis.sha1hex(marker) or ''
if value_sha ~= ARGV[1] or marker_sha ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4])
return 1
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def make_redis_client(url: str, cluster: bool, timeout_s: float) -> redis.Redis | RedisCluster:
    """A client that fails fast: redis-py's default retries stall a request for seconds while Redis is down."""
    if cluster:
        return RedisCluster.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=False
        )
    # One immediate retry (a pooled connection may be stale after a Redis restart), no backoff: redis-py's
    # default retries with exponential backoff held a request for seconds while Redis was down. Only on
    # connection errors, never on timeouts: a timed-out command may still run (a slow Redis had it queued), so
    # sending it again ran non-idempotent scripts twice (an exposure counted 2x) and doubled the wait.
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=10,
        decode_responses=False,
    )


class RedisStore(Store):
    backend = "redis"

    def __init__(self, client: redis.Redis | RedisCluster, namespace: str = "selaras", partitions: int = 1):
        if partitions < 1:
            raise ValueError("a log needs at least one partition")
        self.client = client
        self.ns = namespace
        self.partitions = partitions
        # One hash tag per partition keeps its stream and its idempotency keys in one cluster slot (the append
        # script needs it), and spreads the partitions over the nodes of a cluster. Partition 0 keeps the tag
        # of the single log that came before partitions.
        self._tags = [f"{{{namespace}:log}}"] + [f"{{{namespace}:log:{p}}}" for p in range(1, partitions)]
        self._tag = self._tags[0]
        self.stream_key = self.stream_of(0)
        # redis-py's stubs type the sync/async/cluster clients as one union; these calls are synchronous.
        self._sync: Any = cast(Any, client)
        self._append = self._sync.register_script(_APPEND_SCRIPT)
        self._lease = self._sync.register_script(_LEASE_SCRIPT)
        self._release = self._sync.register_script(_RELEASE_SCRIPT)
        self._merge = self._sync.register_script(_MERGE_SCRIPT)

    def stream_of(self, partition: int) -> str:
        return f"{self._tags[partition]}:stream"

    def _seen_key(self, event_id: str, partition: int = 0) -> str:
        return f"{self._tags[partition]}:seen:{event_id}"

    def _blob_key(self, namespace: str, key: str) -> str:
        return f"{self.ns}:{namespace}:{key}"

    def append_events(self, events: Sequence[PendingEvent]) -> AppendResult:
        """One script call per partition and chunk of APPEND_CHUNK events (a long script blocks Redis for
        every other client). If a later call fails the caller gets an error although earlier ones are stored;
        a re-send then counts those as duplicates, so nothing is lost and nothing is doubled."""
        by_partition: dict[int, list[PendingEvent]] = {}
        for event in events:
            by_partition.setdefault(self.partition_of(event.visitor_id), []).append(event)
        accepted: set[str] = set()
        for partition, pending in sorted(by_partition.items()):
            for start in range(0, len(pending), APPEND_CHUNK):
                chunk = pending[start : start + APPEND_CHUNK]
                keys = [self._seen_key(e.event_id, partition) for e in chunk] + [self.stream_of(partition)]
                args: list[Any] = [DEDUPE_TTL_S] + [e.payload for e in chunk]
                try:
                    accepted_index = cast(list[int], self._append(keys=keys, args=args))
                except RedisError as exc:
                    raise StorageUnavailable(f"event log unavailable: {type(exc).__name__}") from exc
                accepted.update(chunk[i - 1].event_id for i in accepted_index)
        # In the caller's order (an id repeated in the batch is accepted once).
        ordered = tuple(dict.fromkeys(e.event_id for e in events if e.event_id in accepted))
        return AppendResult(len(ordered), len(events) - len(ordered), ordered)

    def read_events(self, after: str | None, limit: int, partition: int = 0) -> list[LogEntry]:
        start = f"({after}" if after else "-"
        try:
            rows = self._sync.xrange(self.stream_of(partition), min=start, max="+", count=limit)
        except RedisError as exc:
            raise StorageUnavailable(f"event log unavailable: {type(exc).__name__}") from exc
        return [LogEntry(pos.decode(), fields[b"e"], partition) for pos, fields in rows]

    def log_length(self, partition: int | None = None) -> int:
        chosen = range(self.partitions) if partition is None else [partition]
        try:
            return sum(int(self._sync.xlen(self.stream_of(p))) for p in chosen)
        except RedisError as exc:
            raise StorageUnavailable("event log unavailable") from exc

    def delete_visitor_events(self, visitor_id: str, payload_marker: bytes) -> int:
        partition = self.partition_of(visitor_id)  # only the visitor's own partition holds its events
        deleted = 0
        after: str | None = None
        while True:
            batch = self.read_events(after, 5000, partition)
            if not batch:
                return deleted
            # The marker only narrows: another visitor's event can mention this id (in its properties), so the
            # parsed visitor id decides.
            doomed = [
                entry.position
                for entry in batch
                if payload_marker in entry.payload and envelope_visitor(entry.payload) == visitor_id
            ]
            if doomed:
                deleted += int(self._call(lambda doomed=doomed: self.client.xdel(self.stream_of(partition), *doomed)))
            after = batch[-1].position

    def forget_event_ids(self, event_ids: Sequence[str], visitor_id: str) -> None:
        partition = self.partition_of(visitor_id)
        if event_ids:
            self._call(lambda: self.client.delete(*[self._seen_key(i, partition) for i in event_ids]))

    def delete_events(self, positions: Sequence[str], partition: int = 0) -> int:
        deleted = 0
        for start in range(0, len(positions), 1000):
            chunk = list(positions[start : start + 1000])
            deleted += int(self._call(lambda chunk=chunk: self.client.xdel(self.stream_of(partition), *chunk)))
        return deleted

    def get_many(self, namespace: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        full = [self._blob_key(namespace, k) for k in keys]
        if isinstance(self.client, RedisCluster):
            return cast(list[bytes | None], self._call(lambda: self.client.mget_nonatomic(full)))
        return cast(list[bytes | None], self._call(lambda: self.client.mget(full)))

    def put_many(self, namespace: str, values: Mapping[str, bytes], ttl_s: int | None = None) -> None:
        if not values:
            return

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, value in values.items():
                pipe.set(self._blob_key(namespace, key), value, ex=ttl_s)
            if namespace not in UNINDEXED_NAMESPACES:
                pipe.sadd(self._index_key(namespace), *values.keys())
            pipe.execute()

        self._call(write)

    def update(
        self, namespace: str, key: str, change: Callable[[bytes | None], bytes], ttl_s: int | None = None
    ) -> bytes:
        full = self._blob_key(namespace, key)
        stored: list[bytes] = []

        def attempt(pipe: Any) -> None:
            # WATCH is set by `transaction`: if another client writes the key before EXEC, the transaction is
            # discarded and this runs again on the new value.
            value = change(pipe.get(full))
            pipe.multi()
            pipe.set(full, value, ex=ttl_s)
            stored[:] = [value]

        self._call(lambda: self._sync.transaction(attempt, full))
        if namespace not in UNINDEXED_NAMESPACES:  # the index is another slot in a cluster; SADD is idempotent
            self._call(lambda: self._sync.sadd(self._index_key(namespace), key))
        return stored[0]

    def _marker_key(self, namespace: str, key: str) -> str:
        # The value's whole key as the hash tag: the marker shares the value's cluster slot (the merge script
        # touches both), and no namespace index or scan of the namespace sees it.
        return "{" + self._blob_key(namespace, key) + "}:applied"

    def merge_many(self, namespace: str, keys: Sequence[str], change: MergeChange) -> dict[str, bytes | None]:
        result: dict[str, bytes | None] = {}
        pending = list(dict.fromkeys(keys))
        while pending:
            names = [self._blob_key(namespace, k) for k in pending] + [self._marker_key(namespace, k) for k in pending]
            if isinstance(self.client, RedisCluster):
                read = cast(list[bytes | None], self._call(lambda names=names: self.client.mget_nonatomic(names)))
            else:
                read = cast(list[bytes | None], self._call(lambda names=names: self.client.mget(names)))
            values, marks = read[: len(pending)], read[len(pending) :]
            writes: list[tuple[str, bytes]] = []
            calls: list[tuple[list[str], list[Any]]] = []
            for key, value, mark in zip(pending, values, marks, strict=True):
                new = change(key, value, mark)
                if new is None:
                    result[key] = value
                    continue
                writes.append((key, new[0]))
                names = [self._blob_key(namespace, key), self._marker_key(namespace, key)]
                calls.append((names, [_sha1(value), _sha1(mark), new[0], new[1]]))
            if not writes:
                break
            indexed = namespace not in UNINDEXED_NAMESPACES
            if isinstance(self.client, RedisCluster):
                # redis-py refuses scripts in a cluster pipeline: one call per record (each on its own node).
                outcome = [self._call(lambda k=k, a=a: self._merge(keys=k, args=a)) for k, a in calls]
                members = [k for k, _ in writes]
                if indexed:
                    self._call(lambda members=members: self._sync.sadd(self._index_key(namespace), *members))
            else:
                pipe = self.client.pipeline(transaction=False)
                for names, args in calls:
                    self._merge(keys=names, args=args, client=pipe)
                if indexed:
                    pipe.sadd(self._index_key(namespace), *[k for k, _ in writes])
                outcome = cast(list[Any], self._call(pipe.execute))
            pending = []
            for (key, value), written in zip(writes, outcome, strict=False):
                if int(written):
                    result[key] = value
                else:
                    pending.append(key)  # another writer came first: read it again and merge into that
        return result

    def _index_key(self, namespace: str) -> str:
        """A set of the namespace's keys: scanning it costs O(namespace), SCAN costs O(whole Redis)."""
        return f"{self.ns}:keys:{namespace}"

    def delete(self, namespace: str, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        # With the applied markers of merged records: a record deleted and folded again starts from nothing.
        full = [self._blob_key(namespace, k) for k in keys] + [self._marker_key(namespace, k) for k in keys]
        if namespace not in UNINDEXED_NAMESPACES:
            self._call(lambda: self._sync.srem(self._index_key(namespace), *keys))
        if isinstance(self.client, RedisCluster):
            for marker in full[len(keys) :]:
                self._call(lambda marker=marker: self.client.delete(marker))
            return sum(int(self._call(lambda k=k: self.client.delete(k))) for k in full[: len(keys)])
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(*full[: len(keys)])
        pipe.delete(*full[len(keys) :])
        return int(cast(list[Any], self._call(pipe.execute))[0])

    def scan(self, namespace: str) -> Iterator[tuple[str, bytes]]:
        prefix = self._blob_key(namespace, "")
        try:
            if namespace in UNINDEXED_NAMESPACES:
                keys = [k.decode() for k in self.client.scan_iter(match=f"{prefix}*", count=1000)]
            else:
                keys = [prefix + k.decode() for k in self._sync.sscan_iter(self._index_key(namespace), count=1000)]
        except RedisError as exc:
            raise StorageUnavailable("store unavailable") from exc
        expired: list[str] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            values = self.get_many(namespace, [k[len(prefix) :] for k in chunk])
            for key, value in zip(chunk, values, strict=True):
                if value is not None:
                    yield key[len(prefix) :], value
                else:
                    expired.append(key[len(prefix) :])
        if expired and namespace not in UNINDEXED_NAMESPACES:  # members whose key expired (TTL)
            self._call(lambda: self._sync.srem(self._index_key(namespace), *expired))

    def _lease_key(self, name: str) -> str:
        # A partition's lease lives in its partition's slot (with its stream); other leases in partition 0's.
        tag = next((t for p, t in enumerate(self._tags) if partition_log(p) == name), self._tag)
        return f"{tag}:lease:{name}"

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        return bool(self._call(lambda: self._lease(keys=[self._lease_key(name)], args=[holder, ttl_ms])))

    def release_lease(self, name: str, holder: str) -> None:
        self._call(lambda: self._release(keys=[self._lease_key(name)], args=[holder]))

    def lease_holder(self, name: str) -> str | None:
        raw = self._call(lambda: self._sync.get(self._lease_key(name)))
        return raw.decode() if raw else None

    def count(self, namespace: str) -> int:
        if namespace in UNINDEXED_NAMESPACES:
            return super().count(namespace)
        return int(self._call(lambda: self._sync.scard(self._index_key(namespace))))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except RedisError:
            return False

    def close(self) -> None:
        self.client.close()

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except RedisError as exc:
            raise StorageUnavailable(f"store unavailable: {type(exc).__name__}") from exc


# ------------------------------------------------------------------------------------------------
# SQLite
# ------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    visitor_id TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_visitor ON events (visitor_id);
CREATE TABLE IF NOT EXISTS seen_ids (event_id TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires_at REAL,
    PRIMARY KEY (ns, key)
);
"""


def connect_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """A durable SQLite connection: WAL (readers never block the writer; both services share the file),
    `synchronous=FULL` (a committed write survives power loss), explicit transactions, the schema applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(schema)
    return conn


class SqliteStore(Store):
    backend = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        # One connection guarded by a lock: SQLite serialises writers anyway, and this keeps it simple.
        self._conn = connect_sqlite(path, _SCHEMA)
        self._lock = threading.Lock()

    def _run(self, fn: Any) -> Any:
        try:
            with self._lock:
                return fn(self._conn)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"store unavailable: {type(exc).__name__}") from exc

    def append_events(self, events: Sequence[PendingEvent]) -> AppendResult:
        now = wall_time()

        def write(conn: sqlite3.Connection) -> tuple[str, ...]:
            conn.execute("BEGIN IMMEDIATE")  # the write lock makes check-then-insert atomic
            try:
                ids = list(dict.fromkeys(e.event_id for e in events))
                seen: set[str] = set()
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    seen.update(
                        row[0]
                        for row in conn.execute(f"SELECT event_id FROM seen_ids WHERE event_id IN ({marks})", chunk)
                    )
                fresh: list[PendingEvent] = []
                for event in events:
                    if event.event_id not in seen:
                        seen.add(event.event_id)
                        fresh.append(event)
                conn.executemany(
                    "INSERT INTO seen_ids (event_id, expires_at) VALUES (?, ?)",
                    [(e.event_id, now + DEDUPE_TTL_S) for e in fresh],
                )
                conn.executemany(
                    "INSERT INTO events (event_id, visitor_id, payload) VALUES (?, ?, ?)",
                    [(e.event_id, e.visitor_id, e.payload) for e in fresh],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return tuple(e.event_id for e in fresh)

        ids = cast(tuple[str, ...], self._run(write))
        return AppendResult(len(ids), len(events) - len(ids), ids)

    def read_events(self, after: str | None, limit: int, partition: int = 0) -> list[LogEntry]:
        _one_partition(partition)
        rows = self._run(
            lambda c: c.execute(
                "SELECT pos, payload FROM events WHERE pos > ? ORDER BY pos LIMIT ?", (int(after or 0), limit)
            ).fetchall()
        )
        return [LogEntry(str(pos), bytes(payload)) for pos, payload in rows]

    def log_length(self, partition: int | None = None) -> int:
        _one_partition(partition or 0)
        return int(self._run(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone()[0]))

    def delete_events(self, positions: Sequence[str], partition: int = 0) -> int:
        _one_partition(partition)
        rows = [(int(p),) for p in positions]
        return int(self._run(lambda c: self._transaction(c, "DELETE FROM events WHERE pos = ?", rows)))

    def delete_visitor_events(self, visitor_id: str, payload_marker: bytes) -> int:
        return int(self._run(lambda c: c.execute("DELETE FROM events WHERE visitor_id = ?", (visitor_id,)).rowcount))

    def forget_event_ids(self, event_ids: Sequence[str], visitor_id: str) -> None:
        self._run(lambda c: self._transaction(c, "DELETE FROM seen_ids WHERE event_id = ?", [(i,) for i in event_ids]))

    def get_many(self, namespace: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        now = wall_time()
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._run(
                lambda c, chunk=chunk, marks=marks: c.execute(
                    f"SELECT key, value FROM blobs WHERE ns = ? AND key IN ({marks})"
                    " AND (expires_at IS NULL OR expires_at > ?)",
                    (namespace, *chunk, now),
                ).fetchall()
            )
            found.update((key, bytes(value)) for key, value in rows)
        return [found.get(k) for k in keys]

    def put_many(self, namespace: str, values: Mapping[str, bytes], ttl_s: int | None = None) -> None:
        expires = wall_time() + ttl_s if ttl_s else None
        rows = [(namespace, key, value, expires) for key, value in values.items()]
        self._run(
            lambda c: self._transaction(
                c,
                "INSERT INTO blobs (ns, key, value, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                rows,
            )
        )

    def update(
        self, namespace: str, key: str, change: Callable[[bytes | None], bytes], ttl_s: int | None = None
    ) -> bytes:
        def write(conn: sqlite3.Connection) -> bytes:
            conn.execute("BEGIN IMMEDIATE")  # the write lock across processes: read, change and write as one
            try:
                row = conn.execute(
                    "SELECT value FROM blobs WHERE ns = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
                    (namespace, key, wall_time()),
                ).fetchone()
                value = change(bytes(row[0]) if row else None)
                conn.execute(
                    "INSERT INTO blobs (ns, key, value, expires_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                    (namespace, key, value, None if ttl_s is None else wall_time() + ttl_s),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return value

        return cast(bytes, self._run(write))

    def merge_many(self, namespace: str, keys: Sequence[str], change: MergeChange) -> dict[str, bytes | None]:
        marker_ns = f"{namespace}@applied"  # markers as rows of their own namespace, in the same transaction
        now = wall_time()

        def read(conn: sqlite3.Connection, ns: str, key: str) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM blobs WHERE ns = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
                (ns, key, now),
            ).fetchone()
            return bytes(row[0]) if row else None

        def write(conn: sqlite3.Connection) -> dict[str, bytes | None]:
            conn.execute("BEGIN IMMEDIATE")  # the write lock across processes: read, change and write as one
            try:
                stored: dict[str, bytes | None] = {}
                for key in dict.fromkeys(keys):
                    value = read(conn, namespace, key)
                    new = change(key, value, read(conn, marker_ns, key))
                    if new is None:
                        stored[key] = value
                        continue
                    conn.executemany(
                        "INSERT INTO blobs (ns, key, value, expires_at) VALUES (?, ?, ?, NULL)"
                        " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires_at = NULL",
                        [(namespace, key, new[0]), (marker_ns, key, new[1])],
                    )
                    stored[key] = new[0]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return stored

        return cast(dict[str, bytes | None], self._run(write))

    @staticmethod
    def _transaction(conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
        """One transaction (one fsync) for many rows: autocommit would sync every row."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = conn.executemany(sql, rows).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(count)

    def delete(self, namespace: str, keys: Sequence[str]) -> int:
        def remove(conn: sqlite3.Connection) -> int:
            markers = [(f"{namespace}@applied", k) for k in keys]  # of merged records (see `merge_many`)
            conn.executemany("DELETE FROM blobs WHERE ns = ? AND key = ?", markers)
            return int(
                conn.executemany("DELETE FROM blobs WHERE ns = ? AND key = ?", [(namespace, k) for k in keys]).rowcount
            )

        return int(self._run(remove))

    def scan(self, namespace: str) -> Iterator[tuple[str, bytes]]:
        now = wall_time()
        rows = self._run(
            lambda c: c.execute(
                "SELECT key, value FROM blobs WHERE ns = ? AND (expires_at IS NULL OR expires_at > ?)",
                (namespace, now),
            ).fetchall()
        )
        for key, value in rows:
            yield key, bytes(value)

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = wall_time()  # lease expiry is infrastructure time, like Redis's PX

        def take(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")  # the write lock makes check-then-set atomic across processes
            try:
                row = conn.execute("SELECT holder, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
                free = row is None or row[0] == holder or row[1] <= now
                if free:
                    conn.execute(
                        "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) ON CONFLICT (name)"
                        " DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                        (name, holder, now + ttl_s),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return free

        return bool(self._run(take))

    def release_lease(self, name: str, holder: str) -> None:
        self._run(lambda c: c.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)))

    def lease_holder(self, name: str) -> str | None:
        row = self._run(
            lambda c: c.execute(
                "SELECT holder FROM leases WHERE name = ? AND expires_at > ?", (name, wall_time())
            ).fetchone()
        )
        return str(row[0]) if row else None

    def count(self, namespace: str) -> int:
        now = wall_time()
        sql = "SELECT COUNT(*) FROM blobs WHERE ns = ? AND (expires_at IS NULL OR expires_at > ?)"
        return int(self._run(lambda c: c.execute(sql, (namespace, now)).fetchone()[0]))

    def ping(self) -> bool:
        try:
            self._run(lambda c: c.execute("SELECT 1").fetchone())
            return True
        except StorageUnavailable:
            return False

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _sha1(value: bytes | None) -> str:
    return hashlib.sha1(value).hexdigest() if value is not None else ""  # a change check, not security


def _one_partition(partition: int) -> None:
    """The embedded store keeps one log: one process folds it (SQLite serialises its writers anyway)."""
    if partition != 0:
        raise ValueError(f"the embedded store has one log partition, not {partition + 1}")


def redis_durability_problems(client: redis.Redis | RedisCluster) -> list[str]:
    """What in the Redis configuration can lose acknowledged data: no AOF (a restart loses the last writes)
    or an eviction policy (under memory pressure Redis silently drops idempotency keys, consent records,
    states or the log itself). Read with INFO, which managed Redis services allow (CONFIG is often refused)."""
    raw: Any = cast(Any, client).info()
    nodes = [raw] if "redis_version" in raw else list(raw.values())  # a cluster answers per node
    problems: set[str] = set()
    for info in nodes:
        if str(info.get("aof_enabled", "0")) not in ("1", "True"):
            problems.add("appendonly is off (set appendonly yes, appendfsync always)")
        policy = str(info.get("maxmemory_policy", "noeviction"))
        if policy != "noeviction":
            problems.add(f"maxmemory-policy is {policy} (set noeviction: a full Redis must refuse writes, not evict)")
    return sorted(problems)


def check_redis_durability(store: Store, environment: str) -> list[str]:
    """At start: refuse to run in production on a Redis that can lose data, warn elsewhere."""
    if not isinstance(store, RedisStore):
        return []
    try:
        problems = redis_durability_problems(store.client)
    except RedisError as exc:
        raise StorageUnavailable(f"cannot read the Redis configuration: {type(exc).__name__}") from exc
    if problems and environment == "production":
        raise RuntimeError("Redis can lose acknowledged data: " + "; ".join(problems))
    for problem in problems:
        log.warning("Redis can lose acknowledged data: %s", problem)
    return problems


def open_store(settings: CommonSettings) -> Store:
    """Redis when REDIS_URL is set, the embedded SQLite file otherwise."""
    if settings.redis_url:
        client = make_redis_client(settings.redis_url, settings.redis_cluster, settings.redis_timeout_s)
        return RedisStore(client, settings.namespace, settings.log_partitions)
    return SqliteStore(settings.sqlite_path)


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
    MESSAGE_HISTORY = "msgcap"  # sends per visitor: frequency caps and cooldowns
    ITEM_CHANGES = "itemchg"  # ids of items whose statistics changed, per time bucket (common/item_changes.py)
    META = "meta"
    MODELS = "models"  # trained models of every kind, their versions and the production pin (common/models.py)
    COMMIT = "commit"  # per log: the writes of the batch being committed (profile/commit.py)
    DEAD_LETTERS = "deadletter"  # log entries the aggregator could not fold, "<log>:<position>"
    AGGREGATOR_STATUS = "aggstatus"  # per log: cursor, lag, errors of its aggregator (readiness, metrics)
    AGGREGATOR_MEMBERS = "aggmember"  # live aggregator processes (expiring): each takes its share of partitions
    ERASED = "erased"  # visitors erased recently: a batch in flight must not write them back (expiring)


CATALOG_VERSION_KEY = "catalog_version"


def save_catalog(store: Store, items: Sequence[Any]) -> None:
    """Upsert catalog items (CatalogItem) and bump the catalog version, so item caches know to reload."""
    store.put_many(Namespace.CATALOG, {item.item_id: item.model_dump_json().encode() for item in items})
    bump_catalog_version(store)


def bump_catalog_version(store: Store) -> None:
    """After any catalog change: every item cache compares this and rebuilds when it moved."""
    store.put(Namespace.META, CATALOG_VERSION_KEY, str(time.time_ns()).encode())


def catalog_version(store: Store) -> bytes | None:
    return store.get(Namespace.META, CATALOG_VERSION_KEY)
