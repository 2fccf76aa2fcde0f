"""One suite for the storage interface, run against both backends (real Redis and SQLite)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.storage import PendingEvent, RedisStore, SqliteStore, Store, make_redis_client
from tests.conftest import REDIS_URL, clean_namespace, unique_name


@pytest.fixture(params=["redis", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "redis":
        namespace = unique_name("st")
        backend: Store = RedisStore(make_redis_client(REDIS_URL, False, 1.0), namespace)
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
    first = store.read_events(None, 4)
    rest = store.read_events(first[-1].position, 100)
    payloads = [e.payload for e in first + rest]
    assert len(payloads) == 10
    assert payloads == [p.payload for p in pending(10)]
    assert store.read_events(rest[-1].position, 10) == []


def test_delete_visitor_events_removes_only_that_visitor(store: Store) -> None:
    # Bob's last event mentions Alice's id in its properties (the bytes the scan narrows on): it stays.
    mention = b'{"at":0,"event":{"visitor_id":"bob","properties":{"visitor_id":"alice"}}}'
    store.append_events(pending(3, "alice", "a") + pending(2, "bob", "b") + [PendingEvent("m", "bob", mention)])
    deleted = store.delete_visitor_events("alice", b'"visitor_id":"alice"')
    assert deleted == 3
    remaining = [e.payload for e in store.read_events(None, 100)]
    assert len(remaining) == 3 and all(b'"visitor_id":"bob"' in p for p in remaining)
    assert remaining[-1] == mention


def test_forgotten_event_ids_can_be_appended_again(store: Store) -> None:
    store.append_events(pending(2))
    store.forget_event_ids(["e0"])
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
