"""`selaras import events` next to a running aggregator, on the partitioned log (real Redis + Feast): the
import takes only partitions nobody holds (its share) and waits for the holder of the others; never a
second consumer of a held partition. Item and visitor totals equal the imported events exactly."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from services.common.clock import DataClock, FixedClock
from services.common.events import Event
from services.common.storage import partition_log
from services.features.aggregations import ItemState, fold_item
from services.profile.app import build_state
from services.profile.importer import import_events
from services.profile.settings import ProfileSettings
from tests.conftest import wait_for
from tests.factories import BASE_TIME, make_event_dict

CLOCK = FixedClock(BASE_TIME + timedelta(days=2))


def test_an_import_next_to_a_running_aggregator_shares_the_partitions_and_counts_every_event_once(
    settings_factory: Callable[..., Any], tmp_path: Path
) -> None:
    settings: ProfileSettings = settings_factory(
        ProfileSettings, aggregator_idle_s=0.01, aggregator_lease_s=1.5, log_partitions=4
    )
    events = [
        make_event_dict(
            event_id=f"ip-{n}",
            visitor_id=f"ip-visitor-{n % 40}",
            type=("product_view", "add_to_cart", "purchase")[n % 3],
            item_id=f"ip-item-{n % 11}",
            timestamp=(BASE_TIME + timedelta(seconds=20 * n)).isoformat(),
        )
        for n in range(3000)
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))

    live = build_state(settings, clock=CLOCK)  # the running service's aggregator
    importer = build_state(settings, clock=CLOCK, aggregator_clock=DataClock())  # `selaras import events`
    store = live.repository.store
    seen_holders: list[list[str | None]] = []
    watching = threading.Event()

    def watch() -> None:
        """Who holds each partition, while the import runs: one holder per partition at any time."""
        while not watching.is_set():
            seen_holders.append([store.lease_holder(partition_log(p)) for p in range(4)])
            watching.wait(0.05)

    try:
        live.aggregator.start(200, 0.01)
        assert wait_for(lambda: len(live.aggregator.held_partitions()) == 4, 10), "the live aggregator took none"
        watcher = threading.Thread(target=watch)
        watcher.start()
        # Folding after every batch keeps the import folding while the live aggregator does: with one fold at the
        # end the live aggregator may fold everything before the import asks for its share.
        report = import_events(path, importer.ingest, importer.aggregator, batch_size=500, fold_every=500)
        watching.set()
        watcher.join()
        assert report.accepted == len(events)
        holders = {h for row in seen_holders for h in row if h}
        assert holders == {live.aggregator.holder, importer.aggregator.holder}, "the import took its share"
        assert not live.repository.unfolded_partitions()

        expected: dict[str, ItemState] = {}
        for raw in events:
            event = Event.model_validate(raw)
            assert event.item_id
            fold_item(expected.setdefault(event.item_id, ItemState(event.item_id)), event)
        stored = {s.item_id: s.buckets for s in live.repository.all_item_states()}
        assert stored == {i: s.buckets for i, s in expected.items()}, "item totals differ from the imported events"
        visitors = live.repository.visitor_states(sorted({e["visitor_id"] for e in events}))
        assert {v: s.event_count for v, s in visitors.items()} == dict(Counter(e["visitor_id"] for e in events))
        assert all(live.repository.commit_record(partition_log(p)) is None for p in range(4))
    finally:
        watching.set()
        importer.aggregator.stop()
        live.aggregator.stop()
        importer.repository.close()
        live.repository.close()
