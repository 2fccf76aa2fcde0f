"""The hot window, measured: Redis memory per retained event, and what an erasure costs on a large log with
the history in Redis (before the archive) and in the archive (after).

    REDIS_URL=redis://127.0.0.1:6379/0 python -m bench.hot_window --events 250000 --visitors 50000

Appends realistic envelopes (product views with context, ~300 bytes each) through the store's idempotent
append, 4 partitions. Memory: `INFO memory` used_memory before and after N events (stream entries plus one
idempotency key each), and `MEMORY USAGE` of each stream. Erasure: the log part of `PrivacyService.erase` for
one visitor (find its events for the idempotency keys, delete them from the stream, and from the archive),
first with every event in the hot window (what erasure read before the archive existed: a scan of the
visitor's partition), then after archiving everything but the newest 1% (files of the partition, pruned by
row-group statistics). Uses its own namespace and temporary directory and deletes its keys at the end."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import redis

from services.common.events import Event, envelope
from services.common.storage import (
    EventArchive,
    Namespace,
    PendingEvent,
    RedisStore,
    make_redis_client,
    partition_log,
)
from services.common.storage.archiver import archive_log
from services.profile.privacy.repository import visitor_marker

KINDS = ("product_view", "product_view", "product_view", "add_to_cart", "purchase")


def make_envelopes(count: int, visitors: int, at: float) -> list[PendingEvent]:
    pending = []
    for n in range(count):
        event = Event.model_validate(
            {
                "event_id": f"hw-{n}",
                "visitor_id": f"hw-visitor-{n % visitors}",
                "type": KINDS[n % len(KINDS)],
                "item_id": f"hw-item-{(n * 7) % 2000}",
                "price": 100_000,
                "timestamp": at - 86400 + n * 0.01,
                "context": {"device": "mobile", "channel": "web", "city": "Jakarta", "session_id": f"s{n // 20}"},
            }
        )
        pending.append(PendingEvent(event.event_id, event.visitor_id, envelope(event, at)))
    return pending


def erase_log_part(store: RedisStore, visitor_id: str) -> tuple[float, int]:
    """The log side of one erasure (`PrivacyService.erase`): its events (for the idempotency keys), then the
    deletes, in the hot window and the archive of the visitor's partition."""
    started = time.perf_counter()
    partition = store.partition_of(visitor_id)
    marker = visitor_marker(visitor_id)
    archived: str | None = None
    found = 0
    if store.archive is not None:
        archived = store.archive.archived_until(partition)
        found += sum(1 for _ in store.archive.visitor_entries(partition, visitor_id))
    found += sum(1 for e in store.iter_hot(partition, archived) if marker in e.payload)
    store.delete_visitor_events(visitor_id, marker)
    if store.archive is not None:
        store.archive.delete_visitor(partition, visitor_id)
    return time.perf_counter() - started, found


def used_memory(client: redis.Redis) -> int:
    # redis-py types every reply as "maybe awaitable": this is the synchronous client.
    info = cast(dict[str, Any], client.info("memory"))
    return int(info["used_memory"])


def memory_usage(client: redis.Redis, key: str, samples: int | None = None) -> int:
    return int(cast(int | None, client.memory_usage(key, samples=samples)) or 0)


def run(url: str, events: int = 250_000, visitors: int = 50_000, erasures: int = 5) -> dict[str, Any]:
    """The measurements (see the module docstring), as a dict for `bench.run`."""
    args = argparse.Namespace(events=events, visitors=visitors, erasures=erasures)
    namespace = f"hw{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(url)
    results: dict[str, Any] = {"events": events, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        archive = EventArchive(Path(tmp))
        store = RedisStore(make_redis_client(url, False, 30.0), namespace, 4, archive)
        try:
            pending = make_envelopes(args.events, args.visitors, store.log_time())
            payload_bytes = sum(len(p.payload) for p in pending) / len(pending)
            before = used_memory(raw)
            for start in range(0, len(pending), 5000):
                store.append_events(pending[start : start + 5000])
            after = used_memory(raw)
            streams = sum(memory_usage(raw, store.stream_of(p), samples=0) for p in range(4))
            keys = [store.seen_key(p.event_id, store.partition_of(p.visitor_id)) for p in pending[:1000]]
            key_bytes = sum(memory_usage(raw, k) for k in keys) / len(keys)
            results["payload_bytes"] = round(payload_bytes)
            results["redis_bytes_per_event"] = round((after - before) / args.events)
            results["stream_bytes_per_event"] = round(streams / args.events)
            results["idempotency_key_bytes"] = round(key_bytes)

            step = max(1, args.visitors // (2 * args.erasures))
            probes = [f"hw-visitor-{n}" for n in range(0, args.visitors, step)][: 2 * args.erasures]
            hot = [erase_log_part(store, v) for v in probes[: args.erasures]]
            results["erasure_all_hot_s"] = [round(s, 3) for s, _ in hot]
            # Everything but the newest 1% archived: the hot window of a shop keeping a week of a year.
            for partition in range(4):
                entries = list(store.iter_hot(partition))
                store.put(Namespace.CURSOR, partition_log(partition), entries[-1].position.encode())
            keep = sorted(e.position for p in range(4) for e in store.iter_hot(p))[-args.events // 100]
            cutoff = int(keep.split("-")[0]) / 1000.0
            started = time.perf_counter()
            report = archive_log(store, archive, cutoff, 0.0, "bench")
            results["archive_s"] = round(time.perf_counter() - started, 1)
            results["archived"] = report.archived
            results["archive_files"] = len(archive.files())
            lookups = []
            for visitor_id in probes[args.erasures :]:
                started = time.perf_counter()
                sum(1 for _ in archive.visitor_entries(store.partition_of(visitor_id), visitor_id))
                lookups.append(round(time.perf_counter() - started, 3))
            results["archive_lookup_s"] = lookups  # what export reads from the archive
            cold = [erase_log_part(store, v) for v in probes[args.erasures :]]
            results["erasure_archived_s"] = [round(s, 3) for s, _ in cold]
            results["events_found_per_visitor"] = [n for _, n in hot + cold]
        finally:
            keys = list(raw.scan_iter(match=f"*{namespace}*", count=10_000))
            for start in range(0, len(keys), 10_000):
                raw.delete(*keys[start : start + 10_000])
            store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=250_000)
    parser.add_argument("--visitors", type=int, default=50_000)
    parser.add_argument("--erasures", type=int, default=5)
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    for name, value in run(url, args.events, args.visitors, args.erasures).items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
