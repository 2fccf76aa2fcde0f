"""In-process folding throughput: append N events to a fresh log, then time the aggregator folding them.

    REDIS_URL=redis://127.0.0.1:6379/0 python -m bench.fold_timing --events 20000 --visitors 5000

A quick check of one aggregator's fold rate (no HTTP, no load generator); `make bench` measures the whole
path. It uses its own namespace and Feast project and deletes its keys at the end."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from services.common.clock import FixedClock
from services.common.events import Event
from services.common.gc_tuning import FOLD_GEN0_THRESHOLD, tuned_for_folding
from services.profile.app import build_state
from services.profile.settings import ProfileSettings

KINDS = ("product_view", "product_view", "product_view", "add_to_cart", "purchase")


def make_events(count: int, visitors: int, items: int, end: datetime) -> list[Event]:
    start = end - timedelta(hours=1)
    step = 3600.0 / count
    return [
        Event.model_validate(
            {
                "event_id": f"ft-{n}",
                "visitor_id": f"ft-visitor-{n % visitors}",
                "type": KINDS[n % len(KINDS)],
                "item_id": f"ft-item-{(n * 7) % items}",
                "price": 100_000,
                "timestamp": (start + timedelta(seconds=n * step)).isoformat(),
                "context": {"device": "mobile", "city": "Jakarta"},
            }
        )
        for n in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--visitors", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument(
        "--gen0",
        type=int,
        default=FOLD_GEN0_THRESHOLD,
        help="collector settings of `selaras run aggregator` (0: CPython's defaults, for comparison)",
    )
    args = parser.parse_args()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace = f"ft{uuid.uuid4().hex[:8]}"
    end = datetime(2026, 11, 20, 12, tzinfo=UTC)
    with tempfile.TemporaryDirectory() as directory:
        settings = ProfileSettings(
            data_dir=Path(directory),
            redis_url=redis_url,
            namespace=namespace,
            feast_project=namespace,
            environment="test",
            aggregator_enabled=False,
        )
        state = build_state(settings, clock=FixedClock(end))
        try:
            events = make_events(args.events, args.visitors, args.items, end)
            for start in range(0, len(events), 1000):
                state.ingest.ingest(events[start : start + 1000])
            started, cpu_started = time.perf_counter(), time.process_time()
            folded = 0
            with tuned_for_folding(args.gen0) if args.gen0 else contextlib.nullcontext():
                while outcome := state.aggregator.run_once(args.batch):
                    if not outcome.events:
                        break
                    folded += outcome.events
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            # CPU seconds of this process (Redis not included): the figure a loaded, shared machine moves least.
            print(
                f"folded {folded:,} events in {seconds:.2f} s: {folded / seconds:,.0f} events/s (batch {args.batch}); "
                f"{cpu:.2f} CPU s: {folded / cpu:,.0f} events per CPU second"
            )
        finally:
            state.aggregator.stop()
            state.repository.close()
            client = redis.Redis.from_url(redis_url)
            doomed = [k for k in client.scan_iter(count=10_000) if namespace.encode() in k]
            for start in range(0, len(doomed), 1000):
                client.delete(*doomed[start : start + 1000])
            client.close()


if __name__ == "__main__":
    main()
