"""Fault test of the hot window: archive and trim runs interleaved with ingest, next to a `selaras run
aggregator` process (with its own archiver thread) that is SIGKILLed mid-stream and restarted. Every logged
event ends up either in the archive or in the hot stream, exactly once; folded totals equal logged totals."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from services.common.events import Event
from services.common.storage import EventArchive, RedisStore, make_redis_client, partition_log
from services.common.storage.archiver import archive_log
from services.features.aggregations import ItemState, fold_item
from tests.conftest import REDIS_URL, clean_namespace, unique_name, wait_for
from tests.deploy.test_faults import AggregatorProcess, service_env

WINDOW_DAYS = 0.00002  # ~1.7 s: events leave Redis for the archive within seconds of being folded


@pytest.mark.slow
def test_archive_and_trim_interleaved_with_ingest_and_an_aggregator_restart(tmp_path: Path) -> None:
    from services.profile.app import build_state
    from services.profile.settings import ProfileSettings

    namespace = unique_name("arf")
    data_dir = tmp_path / "data"
    env = service_env(
        data_dir,
        REDIS_URL,
        namespace,
        namespace,
        PROFILE_AGGREGATOR_LEASE_S="2",
        PROFILE_AGGREGATOR_BATCH="100",
        PROFILE_ARCHIVE_INTERVAL_S="0.5",
        SELARAS_HOT_WINDOW_DAYS=str(WINDOW_DAYS),
        SELARAS_LOG_PARTITIONS="4",
    )
    settings = ProfileSettings(
        data_dir=tmp_path / "client",
        redis_url=REDIS_URL,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        log_partitions=4,
    )
    client = build_state(settings)  # the ingest side only: its aggregator is never started
    repository = client.repository
    # The log as the aggregator process sees it: the same Redis namespace and the same offline directory.
    store = RedisStore(make_redis_client(REDIS_URL, False, 2.0), namespace, 4, EventArchive(data_dir / "offline"))
    assert store.archive is not None
    archive = store.archive
    aggregator = AggregatorProcess(env, tmp_path / "aggregator.log")
    sent: list[Event] = []
    stop = threading.Event()
    manual_runs: list[int] = []
    start = client.clock.now() - 5

    def send(count: int) -> None:
        for _ in range(0, count, 100):
            n0 = len(sent)
            batch = [
                Event.model_validate(
                    {
                        "event_id": f"arf-{n}",
                        "visitor_id": f"arf-v{n % 31}",
                        "type": ("product_view", "add_to_cart", "purchase")[n % 3],
                        "item_id": f"arf-i{n % 13}",
                        "timestamp": datetime.fromtimestamp(start + n * 0.001, UTC).isoformat(),
                        "price": 10_000,
                    }
                )
                for n in range(n0, n0 + 100)
            ]
            assert client.ingest.ingest(batch).accepted == len(batch)
            sent.extend(batch)
            time.sleep(0.02)

    def archive_by_hand() -> None:
        """`selaras archive` run again and again next to the aggregator's own archiver thread."""
        while not stop.is_set():
            report = archive_log(store, archive, store.log_time(), WINDOW_DAYS * 86400, "by-hand")
            manual_runs.append(report.trimmed)
            stop.wait(0.2)

    def folded() -> bool:
        states = repository.visitor_states(sorted({e.visitor_id for e in sent}))
        return sum(s.event_count for s in states.values()) == len(sent) and not repository.unfolded_partitions()

    by_hand = threading.Thread(target=archive_by_hand, daemon=True)
    try:
        aggregator.start()
        assert wait_for(lambda: aggregator.holder() is not None, 120), "the aggregator did not start"
        by_hand.start()
        send(3000)
        aggregator.stop(kill=True)  # mid-stream: whatever it was folding or archiving
        send(1500)  # acknowledged while no aggregator runs
        aggregator.start()
        send(1500)
        assert wait_for(folded, 120), "the log was not folded after the restart"
        # Everything folded leaves the hot window within a few archive intervals.
        assert wait_for(lambda: store.log_length() < len(sent) // 4, 60), store.log_length()
    finally:
        stop.set()
        by_hand.join(10)
        aggregator.stop(kill=True)

    try:
        hot, archived = store.log_length(), archive.count()
        ids = [orjson.loads(entry.payload)["event"]["event_id"] for entry in store.iter_log()]
        assert len(ids) == len(sent) and sorted(ids) == sorted(e.event_id for e in sent), "lost or doubled"
        assert hot + archived == len(sent) and archived > len(sent) // 2
        # Folded totals equal the logged totals (item statistics and visitors).
        expected: dict[str, ItemState] = {}
        for event in sent:
            fold_item(expected.setdefault(event.item_id or "", ItemState(event.item_id or "")), event)
        stored = {s.item_id: s.buckets for s in repository.all_item_states()}
        assert stored == {item_id: s.buckets for item_id, s in expected.items()}, "item totals differ"
        visitors = repository.visitor_states(sorted({e.visitor_id for e in sent}))
        assert {v: s.event_count for v, s in visitors.items()} == dict(Counter(e.visitor_id for e in sent))
        assert all(repository.commit_record(partition_log(p)) is None for p in range(4))
    finally:
        store.close()
        repository.close()
        clean_namespace(REDIS_URL, namespace)
    print(
        f"\narchive under faults: {len(sent)} events, {archived} archived and {hot} hot, each once; "
        f"{len(archive.files())} archive files; hand-run archiver trimmed {sum(manual_runs)}"
    )
