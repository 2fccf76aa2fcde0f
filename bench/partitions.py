"""The partitioned log: folded throughput with 1 and 2 aggregator processes, and bulk import events/s.

    REDIS_URL=redis://127.0.0.1:6379/0 python -m bench.partitions [--events 20000] [--visitors 5000]
    python -m bench.run --only partitions     (the same, saved into bench/results.{json,md})

Folding: `selaras run aggregator` processes (1, then 2) are started on an empty log of 4 partitions and
wait until they hold every partition; then the events are appended (in-process ingest, batches of 1,000,
as the profile API would) and the clock runs until every partition's cursor is at the end of its stream.
Events / that time is the folded throughput, the append included (the API appends while aggregators fold,
on the same 2 cores). Bulk import: the importer (`import_events`, what `selaras import events` runs) on a
fresh namespace with no aggregator running: it appends and folds the partitions itself.
Each run uses its own namespace, Feast project and data directory and deletes its keys at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import redis

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
KINDS = ("product_view", "product_view", "product_view", "add_to_cart", "purchase")


def event_dicts(count: int, visitors: int, items: int, end: datetime, label: str) -> list[dict[str, Any]]:
    """Time-ordered events of the hour before `end` (the importer needs file order = time order)."""
    start = end - timedelta(hours=1)
    step = 3600.0 / count
    return [
        {
            "event_id": f"pb-{label}-{n}",
            "visitor_id": f"pb-visitor-{(n * 7919) % visitors}",
            "type": KINDS[n % len(KINDS)],
            "item_id": f"pb-item-{(n * 7) % items}",
            "price": 100_000,
            "timestamp": (start + timedelta(seconds=n * step)).isoformat(),
            "context": {"device": "mobile", "city": "Jakarta"},
        }
        for n in range(count)
    ]


def _clean(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    for pattern in (f"{namespace}:*", f"{{{namespace}:*"):
        keys = list(client.scan_iter(match=pattern, count=2000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    client.close()


@contextmanager
def _namespace(redis_url: str) -> Iterator[tuple[str, Path]]:
    namespace = f"pb{uuid.uuid4().hex[:8]}"
    directory = Path(tempfile.mkdtemp(prefix=f"{namespace}-"))
    try:
        yield namespace, directory
    finally:
        _clean(redis_url, namespace)
        shutil.rmtree(directory, ignore_errors=True)


def _state(redis_url: str, namespace: str, directory: Path, end: datetime, data_clock: bool = False) -> Any:
    from services.common.clock import DataClock, FixedClock
    from services.profile.app import build_state
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(
        data_dir=directory,
        redis_url=redis_url,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        aggregator_enabled=False,
        log_partitions=PARTITIONS,
    )
    return build_state(settings, clock=FixedClock(end), aggregator_clock=DataClock() if data_clock else None)


def fold_with_processes(redis_url: str, processes: int, events: list[dict[str, Any]], end: datetime) -> dict[str, Any]:
    from services.common.events import Event
    from services.common.storage import partition_log

    with _namespace(redis_url) as (namespace, directory):
        state = _state(redis_url, namespace, directory, end)  # the ingest side; its aggregator never starts
        repository = state.repository
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "SELARAS_DATA_DIR": str(directory),
            "SELARAS_NAMESPACE": namespace,
            "SELARAS_FEAST_PROJECT": namespace,
            "SELARAS_ENVIRONMENT": "test",
            "SELARAS_LOG_LEVEL": "WARNING",
            "SELARAS_LOG_PARTITIONS": str(PARTITIONS),
            "SELARAS_CLOCK_START": end.isoformat(),
            "PROFILE_AGGREGATOR_BATCH": "5000",
            "PROFILE_AGGREGATOR_IDLE_S": "0.01",
            "PROFILE_AGGREGATOR_LEASE_S": "3",
        }
        started: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(processes):
                started.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "services.cli", "run", "aggregator", "--port", "0"],
                        cwd=ROOT,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )

            def holders() -> set[str | None]:
                return {repository.store.lease_holder(partition_log(p)) for p in range(PARTITIONS)}

            deadline = time.monotonic() + 180
            while (None in holders() or len(holders()) < processes) and time.monotonic() < deadline:
                time.sleep(0.2)
            if None in holders() or len(holders()) < processes:
                raise RuntimeError(f"the aggregators did not share the partitions: {holders()}")
            parsed = [Event.model_validate(e) for e in events]
            cpu0, redis0 = _cpu_seconds(started), _redis_cpu_seconds(redis_url)
            t0 = time.perf_counter()
            for start in range(0, len(parsed), 1000):
                state.ingest.ingest(parsed[start : start + 1000])
            appended = time.perf_counter() - t0
            while repository.unfolded_partitions():
                time.sleep(0.05)
            seconds = time.perf_counter() - t0
            cpu, redis_cpu = _cpu_seconds(started) - cpu0, _redis_cpu_seconds(redis_url) - redis0
        finally:
            for process in started:
                process.terminate()
            for process in started:
                process.wait(30)
            repository.close()
    return {
        "processes": processes,
        "partitions": PARTITIONS,
        "events": len(events),
        "append_s": round(appended, 2),
        "folded_s": round(seconds, 2),
        "events_per_s": round(len(events) / seconds),
        # CPU the aggregator processes spent meanwhile: on a shared, loaded machine the wall-clock rate follows
        # the neighbours, events per CPU second much less. Redis's is the whole server's (INFO cpu): on a Redis
        # shared with other clients it includes theirs.
        "aggregator_cpu_s": round(cpu, 2),
        "redis_cpu_s": round(redis_cpu, 2),
        "events_per_aggregator_cpu_s": round(len(events) / cpu) if cpu else None,
    }


def _cpu_seconds(processes: list[subprocess.Popen[bytes]]) -> float:
    import psutil

    return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in processes)


def _redis_cpu_seconds(redis_url: str) -> float:
    client = redis.Redis.from_url(redis_url)
    try:
        info: Any = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        client.close()


def bulk_import(redis_url: str, events: list[dict[str, Any]], end: datetime) -> dict[str, Any]:
    from services.common.gc_tuning import tuned_for_folding
    from services.profile.importer import import_events

    with _namespace(redis_url) as (namespace, directory):
        path = directory / "events.jsonl"
        path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
        state = _state(redis_url, namespace, directory, end, data_clock=True)
        try:
            t0, cpu0 = time.perf_counter(), time.process_time()
            with tuned_for_folding():  # as `selaras import events` runs it
                report = import_events(path, state.ingest, state.aggregator, batch_size=5000)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            state.aggregator.stop()
            state.repository.close()
    return {
        "events": report.accepted,
        "seconds": round(seconds, 2),
        "events_per_s": round(report.accepted / seconds),
        "importer_cpu_s": round(cpu, 2),  # the importer appends and folds in this process
        "events_per_importer_cpu_s": round(report.accepted / cpu) if cpu else None,
        "partitions": PARTITIONS,
    }


def run(redis_url: str, count: int = 20_000, visitors: int = 5_000, items: int = 2_000) -> dict[str, Any]:
    end = datetime(2026, 11, 20, 12, tzinfo=UTC)  # a fixed business time: the figures do not depend on today
    result: dict[str, Any] = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    for processes in (1, 2):
        result[f"fold_{processes}_processes"] = fold_with_processes(
            redis_url, processes, event_dicts(count, visitors, items, end, f"f{processes}"), end
        )
    one, two = result["fold_1_processes"]["events_per_s"], result["fold_2_processes"]["events_per_s"]
    result["ratio_2_to_1"] = round(two / one, 2)
    result["bulk_import"] = bulk_import(redis_url, event_dicts(count, visitors, items, end, "imp"), end)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--visitors", type=int, default=5_000)
    args = parser.parse_args()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    print(orjson.dumps(run(redis_url, args.events, args.visitors), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
