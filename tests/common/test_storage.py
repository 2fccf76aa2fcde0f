"""One suite for the storage interface, run against both backends (real Redis and SQLite)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from redis.crc import key_slot

from services.common.storage import (
    PendingEvent,
    RedisStore,
    SqliteStore,
    Store,
    check_redis_durability,
    make_redis_client,
    partition_of,
    position_order,
)
from tests.conftest import REDIS_URL, RedisServer, clean_namespace, unique_name


@pytest.fixture(params=["redis", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "redis":
        namespace = unique_name("st")
        backend: Store = RedisStore(make_redis_client(REDIS_URL, False, 1.0), namespace, partitions=4)
        yield backend
        backend.close()
        clean_namespace(REDIS_URL, namespace)
    else:
        backend = SqliteStore(tmp_path / "store.db")
        yield backend
        backend.close()


def pending(n: int, visitor: str = "v1", prefix: str = "e") -> list[PendingEvent]:
    return [
        PendingEvent(f"{prefix}{i}", visitor, f'{{"at":0,"event":{{"visitor_id":"{visitor}","n":{i}}}}}'.encode())
        for i in range(n)
    ]


def test_append_is_idempotent_on_event_id(store: Store) -> None:
    first = store.append_events(pending(5))
    again = store.append_events(pending(7))
    assert (first.accepted, first.duplicates) == (5, 0)
    assert (again.accepted, again.duplicates) == (2, 5)
    assert set(again.accepted_ids) == {"e5", "e6"}
    assert store.log_length() == 7


def test_duplicate_inside_one_batch_counts_once(store: Store) -> None:
    batch = [*pending(2), pending(1)[0]]
    result = store.append_events(batch)
    assert (result.accepted, result.duplicates) == (2, 1)


def test_read_events_pages_in_order(store: Store) -> None:
    store.append_events(pending(10))
    partition = store.partition_of("v1")  # one visitor's events stay in order in one partition
    first = store.read_events(None, 4, partition)
    rest = store.read_events(first[-1].position, 100, partition)
    payloads = [e.payload for e in first + rest]
    assert len(payloads) == 10
    assert payloads == [p.payload for p in pending(10)]
    assert store.read_events(rest[-1].position, 10, partition) == []


def test_delete_visitor_events_removes_only_that_visitor(store: Store) -> None:
    # Bob's last event mentions Alice's id in its properties (the bytes the scan narrows on): it stays.
    mention = b'{"at":0,"event":{"visitor_id":"bob","properties":{"visitor_id":"alice"}}}'
    store.append_events(pending(3, "alice", "a") + pending(2, "bob", "b") + [PendingEvent("m", "bob", mention)])
    deleted = store.delete_visitor_events("alice", b'"visitor_id":"alice"')
    assert deleted == 3
    remaining = [e.payload for e in store.read_events(None, 100, store.partition_of("bob"))]
    assert len(remaining) == 3 and all(b'"visitor_id":"bob"' in p for p in remaining)
    assert remaining[-1] == mention


def test_forgotten_event_ids_can_be_appended_again(store: Store) -> None:
    store.append_events(pending(2))
    store.forget_event_ids(["e0"], "v1")
    assert store.append_events(pending(2)).accepted == 1


def test_blobs_roundtrip_scan_and_delete(store: Store) -> None:
    store.put_many("things", {"a": b"1", "b": b"2", "c": b"3"})
    assert store.get_many("things", ["a", "x", "c"]) == [b"1", None, b"3"]
    assert dict(store.scan("things")) == {"a": b"1", "b": b"2", "c": b"3"}
    assert store.delete("things", ["a", "b"]) == 2
    assert dict(store.scan("things")) == {"c": b"3"}
    assert dict(store.scan("other")) == {}


def test_blob_ttl_expires(store: Store) -> None:
    store.put("short", "k", b"v", ttl_s=1)
    assert store.get("short", "k") == b"v"
    time.sleep(1.2)
    assert store.get("short", "k") is None


def test_ping(store: Store) -> None:
    assert store.ping() is True


def test_unreachable_redis_raises_storage_unavailable() -> None:
    from services.common.errors import StorageUnavailable

    dead = RedisStore(make_redis_client("redis://127.0.0.1:1/0", False, 0.2), "dead")
    assert dead.ping() is False
    with pytest.raises(StorageUnavailable):
        dead.append_events(pending(1))
    with pytest.raises(StorageUnavailable):
        dead.get("x", "y")


def test_update_is_compare_and_set_across_connections(store: Store, tmp_path: Path) -> None:
    """Two connections (two processes' worth) increment one record concurrently: no increment is lost."""
    import threading

    if isinstance(store, RedisStore):
        other: Store = RedisStore(make_redis_client(REDIS_URL, False, 1.0), store.ns)
    else:
        other = SqliteStore(tmp_path / "store.db")

    def increment(target: Store) -> None:
        for _ in range(100):
            target.update("counter", "k", lambda raw: str(int(raw or b"0") + 1).encode())

    threads = [threading.Thread(target=increment, args=(s,)) for s in (store, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    other.close()
    assert store.get("counter", "k") == b"200"
    assert [key for key, _ in store.scan("counter")] == ["k"]  # indexed like put_many


def test_a_lease_has_one_holder_until_it_expires_or_is_released(store: Store) -> None:
    assert store.acquire_lease("log-0", "a", 0.4)
    assert store.acquire_lease("log-0", "a", 0.4), "the holder renews its own lease"
    assert not store.acquire_lease("log-0", "b", 0.4), "a second holder is refused while the lease runs"
    assert store.lease_holder("log-0") == "a"
    assert store.acquire_lease("log-1", "b", 0.4), "another log's lease is independent"
    time.sleep(0.6)
    assert store.acquire_lease("log-0", "b", 5.0), "an expired lease can be taken"
    store.release_lease("log-0", "a")  # not the holder: nothing happens
    assert store.lease_holder("log-0") == "b"
    store.release_lease("log-0", "b")
    assert store.lease_holder("log-0") is None
    assert store.acquire_lease("log-0", "a", 5.0)


def test_count_counts_a_namespace(store: Store) -> None:
    store.put_many("deadletter", {"0:1": b"x", "0:2": b"y"})
    store.put("other", "k", b"z")
    assert store.count("deadletter") == 2


def test_a_redis_that_can_lose_data_is_refused_in_production_and_warned_about_elsewhere(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    store = RedisStore(client, unique_name("st"))
    try:
        assert check_redis_durability(store, "production") == []  # AOF on, noeviction (the default)
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.config_set("appendonly", "no")
        problems = check_redis_durability(store, "development")
        assert len(problems) == 2 and "allkeys-lru" in problems[1]
        with pytest.raises(RuntimeError, match="appendonly is off"):
            check_redis_durability(store, "production")
    finally:
        store.close()


def test_merge_many_adds_each_share_once_while_another_connection_merges(store: Store, tmp_path: Path) -> None:
    """Two connections (two aggregator processes' worth) add their partitions' shares to the same records
    concurrently: no share is lost, and a share applied again (same log, same position) adds nothing."""
    import threading

    if isinstance(store, RedisStore):
        other: Store = RedisStore(make_redis_client(REDIS_URL, False, 1.0), store.ns, partitions=4)
    else:
        other = SqliteStore(tmp_path / "store.db")

    def add(log: str, position: int) -> Callable[[str, bytes | None, bytes | None], tuple[bytes, bytes] | None]:
        def change(key: str, value: bytes | None, marker: bytes | None) -> tuple[bytes, bytes] | None:
            applied = orjson.loads(marker) if marker else {}
            if applied.get(log, -1) >= position:
                return None  # this log's share up to `position` is in already
            applied[log] = position
            return str(int(value or b"0") + 1).encode(), orjson.dumps(applied)

        return change

    def merge(target: Store, log: str) -> None:
        for position in range(60):
            target.merge_many("shared", ["a", "b"], add(log, position))
            target.merge_many("shared", ["a", "b"], add(log, position))  # applied again: a no-op

    threads = [threading.Thread(target=merge, args=(s, name)) for s, name in ((store, "p0"), (other, "p1"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    other.close()
    assert store.get_many("shared", ["a", "b"]) == [b"120", b"120"]
    assert sorted(key for key, _ in store.scan("shared")) == ["a", "b"], "the markers are not part of the namespace"
    store.delete("shared", ["a"])
    assert store.merge_many("shared", ["a"], add("p0", 0)) == {"a": b"1"}, "a deleted record starts over"


def test_partitions_split_the_log_by_a_stable_hash_of_the_visitor() -> None:
    namespace = unique_name("st")
    client = make_redis_client(REDIS_URL, False, 1.0)
    store = RedisStore(client, namespace, partitions=4)
    try:
        visitors = [f"visitor-{n}" for n in range(40)]
        events = [
            PendingEvent(f"{v}-e{i}", v, f'{{"at":0,"event":{{"visitor_id":"{v}","n":{i}}}}}'.encode())
            for i in range(3)
            for v in visitors
        ]
        assert store.append_events(events).accepted == 120
        # zlib.crc32 is the same in every process (Python's hash() of a str is not): fixed expectations.
        assert [partition_of(v, 4) for v in ("visitor-0", "visitor-1", "visitor-2", "alice")] == [
            zlib.crc32(v.encode()) % 4 for v in ("visitor-0", "visitor-1", "visitor-2", "alice")
        ]
        for partition in range(4):
            entries = store.read_events(None, 1000, partition)
            assert entries, "40 visitors reach every partition"
            assert {orjson.loads(e.payload)["event"]["visitor_id"] for e in entries} <= {
                v for v in visitors if partition_of(v, 4) == partition
            }
            assert store.log_length(partition) == len(entries)
        assert store.log_length() == 120
        merged = list(store.iter_log(batch=7))
        assert len(merged) == 120
        assert [position_order(e.position) for e in merged] == sorted(position_order(e.position) for e in merged)
        # Each partition is its own hash tag (own cluster slot), shared by its stream and its idempotency keys.
        tags = {store.stream_of(p).split("}")[0] for p in range(4)}
        assert len(tags) == 4
        v = visitors[5]
        assert (
            store._seen_key(f"{v}-e0", partition_of(v, 4)).split("}")[0]
            == store.stream_of(partition_of(v, 4)).split("}")[0]
        )
        assert len({key_slot(store.stream_of(p).encode()) for p in range(4)}) == 4
        # Erasure touches the visitor's own partition only; its idempotency keys live there too.
        assert store.delete_visitor_events(v, f'"visitor_id":"{v}"'.encode()) == 3
        store.forget_event_ids([f"{v}-e0"], v)
        again = store.append_events(events[:41])
        assert again.accepted_ids == (f"{v}-e0",)
    finally:
        store.close()
        clean_namespace(REDIS_URL, namespace)


def test_a_merge_that_leaves_the_applied_marker_as_it_was_is_refused(store: Store) -> None:
    """Stores tell a concurrent writer by the marker alone: a change must move it, or updates could be lost."""
    store.merge_many("shared", ["a"], lambda key, value, marker: (b"1", b"m1"))
    with pytest.raises(ValueError, match="applied marker"):
        store.merge_many("shared", ["a"], lambda key, value, marker: (b"2", marker or b""))
    assert store.get_many("shared", ["a"]) == [b"1"], "nothing was written"
