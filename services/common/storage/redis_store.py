"""The production backend: the event log as Redis streams (one per partition, each its own hash tag),
idempotency keys and blobs as plain keys; Lua scripts keep appends and leases atomic."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from services.common.errors import StorageUnavailable
from services.common.events import envelope_visitor
from services.common.storage.archive import EventArchive
from services.common.storage.base import (
    APPEND_CHUNK,
    DEDUPE_TTL_S,
    UNINDEXED_NAMESPACES,
    AppendResult,
    LogEntry,
    MergeChange,
    PendingEvent,
    Store,
    check_log_partitions,
    partition_log,
    require_new_marker,
    require_unindexed,
)

log = logging.getLogger(__name__)

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
# Compare-and-set on the applied marker alone: every write through `merge_many` changes the marker (see
# `Store.merge_many`), so an unchanged marker means an unchanged value. Hashing the values instead cost Redis a
# SHA-1 of every shared record per batch (item statistics hold up to 720 hourly buckets per counter).
_MERGE_SCRIPT = """
local marker = redis.call('GET', KEYS[2]) or ''
if marker ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
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

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        namespace: str = "selaras",
        partitions: int = 1,
        archive: EventArchive | None = None,
        dedupe_ttl_s: int = DEDUPE_TTL_S,
    ):
        if partitions < 1:
            raise ValueError("a log needs at least one partition")
        self.client = client
        self.archive = archive
        self.dedupe_ttl_s = dedupe_ttl_s
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

    def seen_key(self, event_id: str, partition: int) -> str:
        """The idempotency key of an event id in a partition (the repartition tool moves them)."""
        return self._seen_key(event_id, partition)

    def move_expiring_keys(self, moves: Sequence[tuple[str, str]]) -> int:
        """Rename keys across hash slots keeping their remaining time to live (RENAME needs one slot): copy,
        then delete the source. Returns how many existed."""
        moved = 0
        for start in range(0, len(moves), 500):
            chunk = moves[start : start + 500]
            ttls = [int(t) for t in self._call(lambda chunk=chunk: self._pttl_all([src for src, _ in chunk]))]
            pipe = self.client.pipeline(transaction=False)
            for (src, dst), ttl in zip(chunk, ttls, strict=True):
                if ttl == -2:
                    continue  # expired meanwhile
                pipe.set(dst, b"1", px=ttl if ttl > 0 else None)
                pipe.delete(src)
                moved += 1
            self._call(pipe.execute)
        return moved

    def _pttl_all(self, keys: Sequence[str]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        return cast(list[Any], pipe.execute())

    def drop_partition_keys(self, partition: int) -> None:
        """Delete a partition's (empty) stream: after a repartition to fewer partitions."""
        self._call(lambda: self._sync.delete(self.stream_of(partition)))

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
                args: list[Any] = [self.dedupe_ttl_s] + [e.payload for e in chunk]
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

    def log_time(self) -> float:
        # Stream ids are stamped by the Redis server's clock: measure the hot window on the same one. A cluster
        # answers per node (each stamps its own streams): the earliest, so no node's window is cut short.
        answer = self._call(lambda: self._sync.time())
        stamps = answer.values() if isinstance(answer, dict) else [answer]
        return min(float(seconds) + float(micros) / 1e6 for seconds, micros in stamps)

    def trim_log(self, partition: int, last: str) -> int:
        # MINID removes ids strictly below it: the id right after `last` (same ms, next sequence number). Exact
        # (no "~"): the archive covers precisely what goes.
        ms, _, seq = last.partition("-")
        minid = f"{ms}-{int(seq or 0) + 1}"
        return int(self._call(lambda: self._sync.xtrim(self.stream_of(partition), minid=minid, approximate=False)))

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
                require_new_marker(key, mark, new)
                calls.append((names, [mark or b"", new[0], new[1]]))
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

    def add_members(self, namespace: str, members: Mapping[str, Iterable[str]], ttl_s: int) -> None:
        require_unindexed(namespace)
        additions = {key: list(values) for key, values in members.items()}
        if not any(additions.values()):
            return

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, values in additions.items():
                if values:
                    pipe.sadd(self._blob_key(namespace, key), *values)
                    pipe.expire(self._blob_key(namespace, key), ttl_s)
            pipe.execute()

        self._call(write)

    def members(self, namespace: str, key: str) -> set[str]:
        raw = cast(set[bytes], self._call(lambda: self.client.smembers(self._blob_key(namespace, key))))
        return {m.decode() for m in raw}

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
    """At start: refuse to run in production on a Redis that can lose data, warn elsewhere; refuse everywhere a
    partition count other than the one the log was repartitioned to (`check_log_partitions`)."""
    if not isinstance(store, RedisStore):
        return []
    check_log_partitions(store)
    try:
        problems = redis_durability_problems(store.client)
    except RedisError as exc:
        raise StorageUnavailable(f"cannot read the Redis configuration: {type(exc).__name__}") from exc
    if problems and environment == "production":
        raise RuntimeError("Redis can lose acknowledged data: " + "; ".join(problems))
    for problem in problems:
        log.warning("Redis can lose acknowledged data: %s", problem)
    return problems
