"""Freshness under load: how long from an event's acknowledgement to its visitor's row in `get_online_features`.

    REDIS_URL=redis://127.0.0.1:6379/0 python -m bench.freshness [--rate 5000] [--duration 20] [--aggregators 2]
    python -m bench.run --only freshness     (the same, saved into bench/results.{json,md})

The profile API (`selaras serve profile`, its own aggregator off) and `selaras run aggregator` processes run on
a fresh namespace; the open-loop load generator (bench/loadgen.py) posts batches of 100 events at the offered
rate, all on this machine with Redis. Meanwhile a prober posts one event of a new visitor every 0.25 s and
reads the visitors of the probes not yet visible through Feast's `get_online_features` every 10 ms until a row
counts its event: the time from acknowledgement is one freshness sample (nothing estimated from a histogram).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.partitions import PARTITIONS, _cpu_seconds, _namespace, _redis_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
PROBE_EVERY_S = 0.25
POLL_S = 0.01


def _bodies(path: Path, batches: int, size: int = 100) -> Path:
    """Batches of new events of 50,000 visitors over 2,000 items, stamped now (a live shop's traffic)."""
    rng = np.random.default_rng(3)
    now = datetime.now(UTC)
    kinds = ("product_view", "product_view", "product_view", "add_to_cart")
    with path.open("wb") as handle:
        for b in range(batches):
            events = [
                {
                    "event_id": f"fr-{b}-{j}",
                    "visitor_id": f"fr-visitor-{int(rng.integers(50_000))}",
                    "type": kinds[int(rng.integers(len(kinds)))],
                    "item_id": f"fr-item-{int(rng.integers(2_000))}",
                    "timestamp": (now + timedelta(milliseconds=b)).isoformat(),
                    "context": {"device": "mobile", "city": "Jakarta"},
                }
                for j in range(size)
            ]
            handle.write(orjson.dumps({"events": events}) + b"\n")
    return path


def _post(url: str, events: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(
        url, data=orjson.dumps({"events": events}), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 202:
            raise RuntimeError(f"ingest answered {response.status}")


def _probe(url: str, feature_store: Any, stop: threading.Event, samples: list[float], missed: list[str]) -> None:
    """Posts one event of a new visitor every PROBE_EVERY_S (on a fixed schedule, whatever the freshness) and
    reads every probe not yet visible in one `get_online_features` call every POLL_S. Before, each probe waited
    for the previous one to become visible, so a slow fold also meant few samples (12-16 per 20 s run)."""
    from services.features import schema as F
    from services.features.store import online_rows

    pending: dict[str, float] = {}  # visitor -> when its event was acknowledged
    n = 0
    next_post = time.perf_counter()
    while not stop.is_set() or pending:
        if not stop.is_set() and time.perf_counter() >= next_post:
            visitor = f"fr-probe-{n}"
            event = {
                "event_id": f"fr-probe-{n}",
                "visitor_id": visitor,
                "type": "product_view",
                "item_id": "fr-item-1",
                "timestamp": datetime.now(UTC).isoformat(),
            }
            n += 1
            next_post += PROBE_EVERY_S
            _post(url, [event])
            pending[visitor] = time.perf_counter()
        if pending:
            visitors = list(pending)
            rows = online_rows(feature_store, F.VISITOR_VIEW, visitors)
            seen = time.perf_counter()
            for visitor, row in zip(visitors, rows, strict=True):
                if row.get("event_count"):
                    samples.append(seen - pending.pop(visitor))
                elif seen - pending[visitor] > 30:
                    missed.append(visitor)
                    del pending[visitor]
        time.sleep(POLL_S)


def run(redis_url: str, rate: float = 5_000, duration: float = 20, aggregators: int = 2) -> dict[str, Any]:
    from bench.run import free_port, wait_ready
    from services.common.settings import CommonSettings
    from services.features.store import open_feature_store

    load_average = [round(x, 2) for x in os.getloadavg()]
    with _namespace(redis_url) as (namespace, directory):
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "SELARAS_DATA_DIR": str(directory),
            "SELARAS_NAMESPACE": namespace,
            "SELARAS_FEAST_PROJECT": namespace,
            "SELARAS_ENVIRONMENT": "test",
            "SELARAS_LOG_LEVEL": "WARNING",
            "SELARAS_LOG_PARTITIONS": str(PARTITIONS),
            "PROFILE_AGGREGATOR_ENABLED": "false",
            "PROFILE_AGGREGATOR_IDLE_S": "0.01",
        }
        settings = CommonSettings(
            data_dir=directory,
            redis_url=redis_url,
            namespace=namespace,
            feast_project=namespace,
            environment="test",
            log_partitions=PARTITIONS,
        )
        feature_store = open_feature_store(settings)  # applies the definitions once, before the services start
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started: list[subprocess.Popen[bytes]] = []
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT, "env": env}
        try:
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "services.cli", "serve", "profile", "--port", str(port)],
                    **quiet,  # type: ignore[call-overload]
                )
            )
            for _ in range(aggregators):
                started.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "services.cli", "run", "aggregator", "--port", "0"],
                        **quiet,  # type: ignore[call-overload]
                    )
                )
            wait_ready(f"{url}/readyz")
            _wait_for_holders(settings, aggregators)
            bodies = _bodies(directory / "events.jsonl", int(rate * duration / 100) + 1)
            samples: list[float] = []
            missed: list[str] = []
            stop = threading.Event()
            prober = threading.Thread(
                target=_probe, args=(f"{url}/v1/events", feature_store, stop, samples, missed), daemon=True
            )
            load = [
                sys.executable,
                "-m",
                "bench.loadgen",
                "--url",
                f"{url}/v1/events",
                "--bodies",
                str(bodies),
                "--rate",
                str(rate / 100),
                "--duration",
                str(duration),
                "--connections",
                "32",
            ]
            # Where the 2 cores go during the load: each party's CPU seconds over the run.
            api_cpu, aggregator_cpu = _cpu_seconds(started[:1]), _cpu_seconds(started[1:])
            redis_cpu, children_cpu = _redis_cpu_seconds(redis_url), _children_cpu_seconds()
            load_started = time.perf_counter()
            prober.start()
            outcome = orjson.loads(subprocess.run(load, cwd=ROOT, capture_output=True, check=True).stdout)
            load_s = time.perf_counter() - load_started
            cpu = {
                "api": _cpu_seconds(started[:1]) - api_cpu,
                "aggregators": _cpu_seconds(started[1:]) - aggregator_cpu,
                "redis": _redis_cpu_seconds(redis_url) - redis_cpu,
                "load_generator": _children_cpu_seconds() - children_cpu,
            }
            stop.set()
            prober.join(35)
        finally:
            for process in started:
                process.terminate()
            for process in started:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
    ordered = sorted(samples)

    def quantile(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None

    return {
        "offered_events_per_s": rate,
        "acknowledged_events_per_s": round(outcome["achieved_rate"] * 100, 1),
        "ingest_errors": outcome["errors"],
        "ingest_statuses": outcome["statuses"],  # "error": a connection the server had closed (keep-alive ends)
        "ingest_p99_ms": outcome["p99_ms"],
        "aggregator_processes": aggregators,
        "partitions": PARTITIONS,
        "probes": len(samples),
        "probes_not_visible_in_30s": len(missed),
        "freshness_p50_s": round(statistics.median(ordered), 3) if ordered else None,
        "freshness_p99_s": quantile(0.99),
        "freshness_max_s": round(ordered[-1], 3) if ordered else None,
        "load_average_at_start": load_average,
        # Cores busy on average while the load ran (CPU seconds / the run's seconds); Redis's is the whole server's.
        "cores_busy": {party: round(seconds / load_s, 2) for party, seconds in cpu.items()},
    }


def _wait_for_holders(settings: Any, aggregators: int, timeout_s: float = 180) -> None:
    """Until `aggregators` processes share every partition: one process starts (imports Feast) before the
    other and first takes them all; the load must not start while one aggregator folds for two."""
    from services.common.storage import open_store, partition_log

    store = open_store(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            holders = {store.lease_holder(partition_log(p)) for p in range(PARTITIONS)}
            if None not in holders and len(holders) == min(aggregators, PARTITIONS):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the aggregators did not share the partitions: {holders}")
    finally:
        store.close()


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children waited for: the load generator's run
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=5_000, help="events per second offered (batches of 100)")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--aggregators", type=int, default=2)
    args = parser.parse_args()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    print(orjson.dumps(run(redis_url, args.rate, args.duration, args.aggregators), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
