"""Training's reading of the log, measured: peak memory and time of `Trainer.load` on a large log, against the
way it read the log before (the whole log as a list of events, then consent, then a sort by event time).

    python -m bench.training_load --events 200000 --visitors 40000

Writes the log once into an embedded store under a temporary directory (shop-like envelopes: views, carts,
purchases, impressions and clicks with context, in arrival order with late events), archives 90% of it and
keeps the rest hot, then loads it in a fresh process per way (time and the process's peak RSS of one load,
then the `tracemalloc` peak above what was allocated before a second load), and checks both ways give the
same event sequence. `Trainer.load` before this bench's commit is reproduced in `load_before`."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.common.consent import Consent, ConsentDefaults
from services.common.events import Event, envelope
from services.common.settings import CommonSettings
from services.common.storage import Namespace, PendingEvent, partition_log
from services.common.storage.archiver import archive_log
from services.recommend.repository import RecommendRepository
from services.recommend.training.event_columns import LoggedEvent
from services.recommend.training.train import TrainConfig, Trainer

KINDS = ("product_view",) * 6 + ("add_to_cart", "purchase", "impression", "impression", "click", "search")
START = datetime(2026, 11, 1, tzinfo=UTC).timestamp()


def settings_for(directory: Path) -> CommonSettings:
    return CommonSettings(data_dir=directory, redis_url=None, environment="test")


def make_events(count: int, visitors: int, seed: int = 5) -> list[PendingEvent]:
    rng = random.Random(seed)
    span = 30 * 86400.0
    pending = []
    for n in range(count):
        kind = KINDS[rng.randrange(len(KINDS))]
        # Mostly in order of arrival, one in ten late (an offline client, a retry) by up to a day.
        ts = START + span * n / count - (rng.random() * 86400 if rng.random() < 0.1 else 0.0)
        raw: dict[str, Any] = {
            "event_id": f"tl-{n}",
            "visitor_id": f"tl-visitor-{rng.randrange(visitors)}",
            "type": kind,
            "item_id": f"tl-item-{rng.randrange(5000)}",
            "price": 150_000,
            "timestamp": datetime.fromtimestamp(ts, tz=UTC).isoformat(),
            "context": {
                "device": rng.choice(["mobile", "desktop"]),
                "channel": "web",
                "city": rng.choice(["Jakarta", "Surabaya", "Bandung", "Medan"]),
                "locale": "id",
                "session_id": f"s{n // 15}",
                "referrer": "https://www.google.com/",
            },
        }
        if kind in ("impression", "click"):
            raw["recommendation_id"] = f"rec-{n // 12}"
        if kind == "impression":
            raw["properties"] = {"slot": "home", "position": n % 12}
        if kind == "search":
            raw["query"] = "kemeja batik"
            del raw["item_id"]
        event = Event.model_validate(raw)
        pending.append(PendingEvent(event.event_id, event.visitor_id, envelope(event, ts)))
    return pending


def prepare(directory: Path, count: int, visitors: int) -> None:
    repository = RecommendRepository.open(settings_for(directory))
    store = repository.store
    assert store.archive is not None
    events = make_events(count, visitors)
    archived = int(count * 0.9)
    for start in range(0, archived, 5000):
        store.append_events(events[start : min(start + 5000, archived)])
    for partition in range(store.partitions):
        last = None
        for entry in store.iter_hot(partition):
            last = entry.position
        if last is not None:
            store.put(Namespace.CURSOR, partition_log(partition), last.encode())
    archive_log(store, store.archive, store.log_time() + 5.0, 1.0, "bench")
    for start in range(archived, count, 5000):
        store.append_events(events[start : start + 5000])
    refusing = {f"tl-visitor-{v}": Consent(given={"analytics": False}).to_bytes() for v in range(0, visitors, 20)}
    store.put_many(Namespace.CONSENT, refusing)
    repository.close()


def load_before(repository: RecommendRepository, config: TrainConfig) -> list[Event]:
    """`Trainer.load` as it was: every event of the log in a list, then consent, then a sort by time."""
    events = list(repository.logged_events())
    defaults = ConsentDefaults(analytics=config.analytics_default)
    refused = repository.refusing("analytics", (e.visitor_id for e in events), defaults)
    return sorted((e for e in events if e.visitor_id not in refused), key=lambda e: e.ts)


def load(repository: RecommendRepository, way: str) -> Any:
    config = TrainConfig()
    if way == "before":
        return load_before(repository, config)
    return Trainer(repository, config).load()[0]


def measure(directory: Path, way: str) -> dict[str, Any]:
    """One untraced load (time, the process's peak RSS), then one under tracemalloc (peak Python allocations)."""
    repository = RecommendRepository.open(settings_for(directory))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    events = load(repository, way)
    seconds = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del events
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    events = load(repository, way)
    peak = tracemalloc.get_traced_memory()[1] - base
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rows = [LoggedEvent.of(e) for e in events] if way == "before" else list(events)
    digest = hashlib.sha256(repr(rows).encode()).hexdigest()
    repository.close()
    return {
        "way": way,
        "events": len(events),
        "seconds": round(seconds, 1),
        "traced_peak_mb": round(peak / 2**20, 1),
        "traced_held_mb": round(held / 2**20, 1),
        "max_rss_mb": round(rss_after, 1),
        "max_rss_before_load_mb": round(rss_before, 1),
        "digest": digest[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--visitors", type=int, default=40_000)
    parser.add_argument("--measure", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.directory, args.measure)))
        return
    with tempfile.TemporaryDirectory(prefix="selaras-training-load-") as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        prepare(directory, args.events, args.visitors)
        print(f"log of {args.events} events written in {time.perf_counter() - started:.0f} s")
        results = []
        for way in ("before", "after"):
            command = [sys.executable, "-m", "bench.training_load", "--measure", way, "--directory", str(directory)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(results[-1])
        assert results[0]["digest"] == results[1]["digest"], "the two ways loaded different events"
        assert results[0]["events"] == results[1]["events"]


if __name__ == "__main__":
    main()
