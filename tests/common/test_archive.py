"""The event archive and the archiver, against both store backends (real Redis and SQLite): what is folded
and older than the hot window moves to parquet exactly once, readers see archive + hot window as one log."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import duckdb
import orjson
import pytest

from services.common.events import envelope
from services.common.storage import (
    EventArchive,
    Namespace,
    PendingEvent,
    RedisStore,
    SqliteStore,
    Store,
    make_redis_client,
    partition_log,
    position_order,
)
from services.common.storage.archive import ArchiveRow
from services.common.storage.archiver import appended_at, archive_log, archive_partition
from tests.conftest import REDIS_URL, clean_namespace, unique_name
from tests.factories import make_event


@pytest.fixture(params=["redis", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    archive = EventArchive(tmp_path / "offline")
    if request.param == "redis":
        namespace = unique_name("ar")
        backend: Store = RedisStore(make_redis_client(REDIS_URL, False, 1.0), namespace, 4, archive)
        yield backend
        backend.close()
        clean_namespace(REDIS_URL, namespace)
    else:
        backend = SqliteStore(tmp_path / "store.db", archive)
        yield backend
        backend.close()


def log_events(store: Store, count: int, visitors: int = 7, prefix: str = "e") -> list[str]:
    events = [make_event(event_id=f"{prefix}{i}", visitor_id=f"v{i % visitors}") for i in range(count)]
    result = store.append_events(
        [PendingEvent(e.event_id, e.visitor_id, envelope(e, store.log_time())) for e in events]
    )
    assert result.accepted == count
    return [e.event_id for e in events]


def fold_to_end(store: Store) -> None:
    """What the aggregator leaves behind: every partition's cursor at its last entry."""
    for partition in range(store.partitions):
        entries = list(store.iter_hot(partition))
        if entries:
            store.put(Namespace.CURSOR, partition_log(partition), entries[-1].position.encode())


def logged_ids(entries: Iterator[object]) -> list[str]:
    return [orjson.loads(e.payload)["event"]["event_id"] for e in entries]  # type: ignore[attr-defined]


def test_archive_moves_folded_entries_and_readers_see_one_log(store: Store) -> None:
    assert store.archive is not None
    ids = log_events(store, 300)
    before = [(e.partition, e.position) for e in store.iter_log()]
    fold_to_end(store)
    report = archive_log(store, store.archive, store.log_time() + 1, 0.0, "test")
    assert report.archived == report.trimmed == 300
    assert store.log_length() == 0 and store.archive.count() == 300
    # One iterator over archive and hot window: the same entries, in the same order, each once.
    assert [(e.partition, e.position) for e in store.iter_log()] == before
    assert sorted(logged_ids(store.iter_log())) == sorted(ids)
    for partition in range(store.partitions):
        positions = [position_order(e.position) for e in store.iter_partition(partition)]
        assert positions == sorted(positions)
    # DuckDB reads the archive as a table, partitioned by day and log partition.
    glob = str(store.archive.root / "*" / "*" / "*.parquet")
    ((count, partitions),) = duckdb.sql(
        f"SELECT count(*), count(DISTINCT partition) FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchall()
    assert count == 300 and partitions == store.partitions


def test_nothing_unfolded_or_inside_the_window_is_archived(store: Store) -> None:
    assert store.archive is not None
    log_events(store, 100)
    # Folded up to a point in partition 0 only.
    entries = list(store.iter_hot(0))
    folded = len(entries) // 2
    assert folded >= 5
    store.put(Namespace.CURSOR, partition_log(0), entries[folded - 1].position.encode())
    inside = archive_log(store, store.archive, store.log_time(), 3600.0, "test")
    assert inside.archived == inside.trimmed == 0, "everything is younger than the window"
    report = archive_log(store, store.archive, store.log_time() + 1, 0.0, "test")
    assert report.archived == report.trimmed == folded
    assert [p.skipped for p in report.partitions[1:]] == ["nothing folded yet"] * (store.partitions - 1)
    assert store.log_length() == 100 - folded and len(list(store.iter_log())) == 100
    # Events logged after the cutoff stay hot even once folded.
    cutoff_clock = store.log_time()
    time.sleep(0.01)
    log_events(store, 20, prefix="late")
    fold_to_end(store)
    report = archive_log(store, store.archive, cutoff_clock, 0.0, "test")
    assert store.archive.count() == 100 and store.log_length() == 20
    assert sorted(logged_ids(store.iter_hot_log())) == sorted(f"late{i}" for i in range(20))


def test_a_crash_between_archive_and_trim_neither_duplicates_nor_loses(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert store.archive is not None
    ids = log_events(store, 120)
    fold_to_end(store)

    def crash(partition: int, last: str) -> int:
        raise RuntimeError("killed before the trim")

    with monkeypatch.context() as patch:
        patch.setattr(store, "trim_log", crash)
        with pytest.raises(RuntimeError):
            archive_partition(store, store.archive, 0, store.log_time() + 1, "test")
    in_partition = store.log_length(0)
    assert store.archive.count(0) == in_partition > 0, "archived, still in the stream"
    # Readers see each entry once meanwhile.
    assert sorted(logged_ids(store.iter_log())) == sorted(ids)
    # More events, folded, then the archiver runs again: the archived range is only trimmed, the rest archived.
    more = log_events(store, 30, prefix="more")
    fold_to_end(store)
    report = archive_log(store, store.archive, store.log_time() + 1, 0.0, "test")
    assert report.trimmed == 150 and report.archived == 150 - in_partition
    assert store.archive.count() == 150 and store.log_length() == 0
    assert sorted(logged_ids(store.iter_log())) == sorted(ids + more)


def test_rows_of_an_erased_visitor_never_reach_the_archive(store: Store) -> None:
    assert store.archive is not None
    log_events(store, 70, visitors=7)
    fold_to_end(store)
    store.put(Namespace.ERASED, "v3", orjson.dumps({"until": None}))  # an erasure in progress
    archive_log(store, store.archive, store.log_time() + 1, 0.0, "test")
    visitors = {orjson.loads(e.payload)["event"]["visitor_id"] for e in store.iter_log()}
    assert "v3" not in visitors and len(visitors) == 6
    assert store.archive.count() == 60


def test_erasure_rewrites_only_the_files_that_hold_the_visitor(tmp_path: Path) -> None:
    archive = EventArchive(tmp_path)
    rows = [ArchiveRow(f"{1000 + i}-0", f"v{i % 5}", f"e{i}", 1.0 + i, 86_400.0 * (i // 50), b"{}") for i in range(100)]
    archive.write(0, rows[:50], lambda _: set())  # day 1 holds v0..v4
    archive.write(0, [r for r in rows[50:] if r.visitor_id != "v2"], lambda _: set())  # day 2 no v2
    mtimes = {f.path: f.path.stat().st_mtime_ns for f in archive.files(0)}
    assert archive.delete_visitor(0, "v2") == (10, 1)
    changed = [f.path for f in archive.files(0) if f.path.stat().st_mtime_ns != mtimes[f.path]]
    assert len(changed) == 1 and "1970-01-01" in str(changed[0])
    assert [e.position for e in archive.visitor_entries(0, "v2")] == []
    assert [e.position for e in archive.visitor_entries(0, "v1")] == [f"{1000 + i}-0" for i in range(1, 100, 5)]


def test_appended_at_follows_the_store_clock(store: Store) -> None:
    log_events(store, 1)
    (entry,) = list(store.iter_hot_log())
    assert abs(appended_at(entry) - store.log_time()) < 60


def test_a_window_of_days_archives_whole_days(store: Store) -> None:
    assert store.archive is not None
    log_events(store, 50)
    fold_to_end(store)
    logged_at = store.log_time()
    day = 86_400.0
    midnight = logged_at // day * day
    # Over seven days later, but the day the events were logged did not end seven days ago: nothing goes.
    early = archive_log(store, store.archive, midnight + 8 * day - 60, 7 * day, "test")
    assert early.cutoff == midnight and early.archived == 0 and store.log_length() == 50
    late = archive_log(store, store.archive, midnight + 8 * day + 60, 7 * day, "test")
    assert late.cutoff == midnight + day and late.archived == 50 and store.log_length() == 0
    assert {f.path.parent.parent.name for f in store.archive.files()} == {
        "day=" + time.strftime("%Y-%m-%d", time.gmtime(logged_at))
    }


def test_erasures_racing_the_archiver_leave_nothing_of_the_visitors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archiver looping (window 0, cursor following the log) while events are appended and visitors are
    erased the way `PrivacyService.erase` does it (mark, delete hot entries, purge the archive, mark done): no
    erased visitor's event survives anywhere, every other event is there exactly once."""
    import random
    import threading

    from services.profile.repository import mark_erased

    namespace = unique_name("race")
    archive = EventArchive(tmp_path / "offline")
    store = RedisStore(make_redis_client(REDIS_URL, False, 2.0), namespace, 4, archive)
    write = archive.write

    def slow_write(*args: object, **kwargs: object) -> object:
        time.sleep(0.2)  # a slow volume: erasures land between the archiver's read and its write
        return write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(archive, "write", slow_write)
    visitors = [f"r{n}" for n in range(16)]
    doomed = visitors[:6]
    erased: set[str] = set()
    logged: list[tuple[str, str]] = []
    stop = threading.Event()
    sending = threading.Lock()  # a batch is built and appended under it: none of a visitor after its erasure

    def append() -> None:
        n = 0
        while not stop.is_set():
            with sending:
                batch = []
                for _ in range(40):
                    visitor = random.choice([v for v in visitors if v not in erased])
                    event = make_event(event_id=f"race-{n}", visitor_id=visitor)
                    batch.append(PendingEvent(event.event_id, visitor, envelope(event, store.log_time())))
                    logged.append((event.event_id, visitor))
                    n += 1
                store.append_events(batch)
            time.sleep(0.005)

    def archive_loop() -> None:
        while not stop.is_set():
            fold_to_end(store)
            archive_log(store, archive, store.log_time() + 1, 0.0, "race")

    threads = [threading.Thread(target=append), threading.Thread(target=archive_loop)]
    try:
        for thread in threads:
            thread.start()
        for visitor in doomed:
            time.sleep(random.uniform(0.05, 0.3))
            with sending:
                erased.add(visitor)  # no event of the visitor is appended once its erasure starts
            mark_erased(store, visitor, None)
            store.delete_visitor_events(visitor, b'"visitor_id":"' + visitor.encode() + b'"')
            archive.delete_visitor(store.partition_of(visitor), visitor)
            mark_erased(store, visitor, store.log_time())
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    try:
        fold_to_end(store)
        archive_log(store, archive, store.log_time() + 1, 0.0, "race")
        found = Counter(orjson.loads(e.payload)["event"]["event_id"] for e in store.iter_log())
        kept = {event_id for event_id, visitor in logged if visitor not in set(doomed)}
        assert set(found) == kept and set(found.values()) == {1}
        assert archive.count() > 0
    finally:
        store.close()
        clean_namespace(REDIS_URL, namespace)
