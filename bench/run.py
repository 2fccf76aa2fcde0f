"""`make bench`: every benchmark of issue #7 against the real services on the Redis online store.

Each HTTP benchmark runs an open-loop load generator (bench/loadgen.py) in its own process on loopback and
repeats runs so medians can be quoted. Results go to bench/results.json and bench/results.md.

    python -m bench.run [--quick] [--reuse-world] [--only recommend,naive,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]
TMP = ROOT / "bench" / "tmp"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SLOTS = [
    {"name": "home", "kind": "product", "count": 12},
    {"name": "hero", "kind": "banner", "count": 1},
    {"name": "cta", "kind": "cta", "count": 2},
]


def log(message: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": commit.strip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_for(namespace: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "SELARAS_DATA_DIR": str(data_dir),
        "SELARAS_NAMESPACE": namespace,
        "SELARAS_FEAST_PROJECT": namespace,
        "SELARAS_LOG_LEVEL": "WARNING",
        **extra,
    }


def wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready")


@contextmanager
def service(name: str, env: dict[str, str], workers: int = 1) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    args = [sys.executable, "-m", "services.cli", "serve", name, "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz")
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def rss_mb(process: subprocess.Popen[bytes]) -> dict[str, float]:
    parent = psutil.Process(process.pid)
    workers = parent.children(recursive=True) or [parent]
    sizes = [p.memory_info().rss / 2**20 for p in workers]
    return {"max_worker_mb": round(max(sizes), 1), "total_mb": round(sum(sizes), 1), "workers": len(sizes)}


def cpu_seconds(process: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU of a service (its uvicorn workers included)."""
    if process is None:
        return 0.0
    parent = psutil.Process(process.pid)
    total = 0.0
    for member in [parent, *parent.children(recursive=True)]:
        times = member.cpu_times()
        total += times.user + times.system
    return total


def redis_cpu_seconds() -> float:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        info = cast(dict[str, Any], client.info("cpu"))
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        client.close()


def load(
    url: str,
    bodies: Path,
    rate: float,
    duration: float,
    connections: int = 64,
    process: subprocess.Popen[bytes] | None = None,
) -> dict[str, Any]:
    """One open-loop run; with the service's process, also the CPU each party spent per request (the evidence
    for where a 2-core machine's time goes: service, load generator and Redis share the same cores)."""
    service_before, redis_before = cpu_seconds(process), redis_cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--url",
            url,
            "--bodies",
            str(bodies),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--connections",
            str(connections),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process is not None and result["requests"]:
        spent = {
            "service": cpu_seconds(process) - service_before,
            "load_generator": (children_after.ru_utime + children_after.ru_stime)
            - (children_before.ru_utime + children_before.ru_stime),
            "redis": redis_cpu_seconds() - redis_before,
        }
        result["cpu_ms_per_request"] = {k: round(1000 * v / result["requests"], 2) for k, v in spent.items()}
        result["cores_busy"] = {k: round(v / duration, 2) for k, v in spent.items()}
    return result


def repeated(runs: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    samples = [fn() for _ in range(runs)]
    return {
        "runs": samples,
        "median_p50_ms": statistics.median(s["p50_ms"] for s in samples),
        "median_p99_ms": statistics.median(s["p99_ms"] for s in samples),
        "errors": sum(s["errors"] for s in samples),
        "median_achieved_rate": statistics.median(s["achieved_rate"] for s in samples),
    }


def recommend_bodies(path: Path, visitors: list[str], n: int = 2000, anonymous_share: float = 0.2) -> Path:
    rng = np.random.default_rng(1)
    cities = ["Jakarta", "Surabaya", "Bandung", "Medan", "Makassar", "Denpasar"]
    with path.open("w") as handle:
        for i in range(n):
            visitor = f"anon-{i}" if rng.random() < anonymous_share else str(rng.choice(visitors))
            body = {
                "visitor_id": visitor,
                "slots": SLOTS,
                "context": {
                    "device": str(rng.choice(["mobile", "desktop", "app"])),
                    "channel": "web",
                    "city": str(rng.choice(cities)),
                },
            }
            handle.write(orjson.dumps(body).decode() + "\n")
    return path


def event_bodies(
    path: Path, visitors: list[str], items: list[str], batches: int, size: int = 100, label: str = ""
) -> Path:
    """Batches of new events (ids unique per process and label: a resent id would only be a cheap duplicate).

    Visitors: half the events from the world's known visitors, half from 50,000 others. Live traffic comes
    from many visitors at once; 1,000 visitors sending every event would each reach thousands of events in
    minutes (a bot's profile), and the cost of folding grows with the size of a visitor's state."""
    rng = np.random.default_rng(2)
    others = 50_000
    population = [*visitors, *(f"bench-visitor-{i}" for i in range(others))]
    weights = np.concatenate([np.full(len(visitors), 0.5 / len(visitors)), np.full(others, 0.5 / others)])
    kinds = np.array(["product_view", "product_view", "product_view", "add_to_cart"])
    now = datetime.now(UTC)
    with path.open("w") as handle:
        for b in range(batches):
            who = rng.choice(len(population), size=size, p=weights)
            what = rng.choice(len(items), size=size)
            kind = rng.choice(kinds, size=size)
            events = [
                {
                    "event_id": f"bench-{os.getpid()}-{label}-{b}-{j}",
                    "visitor_id": population[int(who[j])],
                    "type": str(kind[j]),
                    "item_id": items[int(what[j])],
                    "timestamp": (now + timedelta(milliseconds=b * size + j)).isoformat(),
                    "context": {"device": "mobile", "city": "Jakarta"},
                }
                for j in range(size)
            ]
            handle.write(orjson.dumps({"events": events}).decode() + "\n")
    return path


def histogram_quantile(
    metrics_text: str, name: str, q: float, before: dict[float, float] | None = None
) -> tuple[float, dict[float, float]]:
    """q-quantile of a Prometheus histogram from /metrics text (optionally the delta since `before`)."""
    buckets: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    if before:
        buckets = {le: count - before.get(le, 0.0) for le, count in buckets.items()}
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan"), buckets
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le, buckets
    return float("inf"), buckets


def clean_namespace(namespace: str) -> None:
    """Remove a previous run's keys (the log, state, idempotency keys) of this benchmark namespace."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (f"{namespace}:*", f"{{{namespace}:*"):
        batch = []
        for key in client.scan_iter(match=pattern, count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
    client.close()


def metric_sums(text: str) -> dict[str, float]:
    """`<stage>_sum` / `<stage>_count` of the recommend stage histogram, and `http_sum` / `http_count` of the
    HTTP histogram of /v1/recommend (summed over workers by the multiprocess collector)."""
    from prometheus_client.parser import text_string_to_metric_families

    http_names = ("selaras_http_request_duration_seconds_sum", "selaras_http_request_duration_seconds_count")
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            suffix = sample.name.rsplit("_", 1)[1]
            if sample.name.startswith("selaras_recommend_stage_seconds_") and "stage" in sample.labels:
                sums[f"{sample.labels['stage']}_{suffix}"] = sample.value
            elif sample.name in http_names and sample.labels.get("route") == "/v1/recommend":
                sums[f"http_{suffix}"] = sample.value
    return sums


def time_per_request_ms(before: str, after: str) -> dict[str, float]:
    """Mean milliseconds per request in each ranking stage (summed over the request's slots) and in the whole
    ASGI app ("http"), between two scrapes of the service's /metrics."""
    start, end = metric_sums(before), metric_sums(after)

    def delta(key: str) -> float:
        return end.get(key, 0.0) - start.get(key, 0.0)

    requests = delta("http_count")
    if requests <= 0:
        return {}
    stages = ("visitor", "candidates", "features", "predict", "rules", "http")
    return {stage: round(1000 * delta(f"{stage}_sum") / requests, 3) for stage in stages}


def counter_value(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    # Summed over labels (the aggregator's gauges are per partition).
    return float(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )
    )


def wait_folded(url: str, target: float, timeout: float) -> float | None:
    """Poll the profile service until it has folded `target` events in total; when that happened (monotonic),
    or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if counter_value(get_text(f"{url}/metrics"), "selaras_events_aggregated_total") >= target:
            return time.monotonic()
        time.sleep(0.1)
    return None


def skip_leftover_events(namespace: str) -> None:
    """An ingestion run leaves events the aggregator had not folded when its service stopped; with a reused
    world the next run would fold those first and count their age as its freshness. Start after them."""
    from services.common.settings import CommonSettings
    from services.common.storage import Namespace, RedisStore, make_redis_client, partition_log

    partitions = CommonSettings().log_partitions
    store = RedisStore(make_redis_client(REDIS_URL, False, 5.0), namespace, partitions)
    try:
        for partition in range(partitions):
            last = cast(list[tuple[bytes, Any]], store.client.xrevrange(store.stream_of(partition), count=1))
            if last:
                store.put(Namespace.CURSOR, partition_log(partition), last[0][0])
    finally:
        store.close()


def wait_drained(url: str, timeout: float) -> None:
    """Until the aggregator has folded the whole log (events an earlier run left unfolded would otherwise be
    counted in this run's freshness)."""
    deadline = time.monotonic() + timeout
    idle_polls = 0
    while time.monotonic() < deadline and idle_polls < 3:
        text = get_text(f"{url}/metrics")
        idle_polls = idle_polls + 1 if counter_value(text, "selaras_aggregator_backlog_events") == 0 else 0
        time.sleep(0.2)


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def world_in_redis(namespace: str) -> bool:
    """A marker file outlives a flushed Redis: reuse a world only while its catalog is still stored."""
    from services.common.storage import RedisStore, catalog_version, make_redis_client

    store = RedisStore(make_redis_client(REDIS_URL, False, 5.0), namespace)
    try:
        return catalog_version(store) is not None
    finally:
        store.close()


def build(namespace: str, data_dir: Path, reuse: bool, **kwargs: Any) -> dict[str, Any]:
    marker = data_dir / "bench-world.json"
    if reuse and marker.exists() and world_in_redis(namespace):
        log(f"reusing world {namespace}")
        return dict(json.loads(marker.read_text()))
    from services.common.settings import CommonSettings
    from services.demo.world import build_world

    clean_namespace(namespace)
    if data_dir.exists():
        import shutil

        shutil.rmtree(data_dir)
    settings = CommonSettings(data_dir=data_dir, redis_url=REDIS_URL, namespace=namespace, feast_project=namespace)
    started = time.perf_counter()
    world = build_world(settings, **kwargs)
    info = {
        "events": world.events,
        "seconds": world.seconds,
        "import_events_per_s": round(world.events / world.seconds["import"], 1),
        "train": world.train_metrics,
        "visitors": [v.visitor_id for v in world.simulator.visitors],
        "items": [p.item_id for p in world.shop.products if p.in_stock],
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    marker.write_text(json.dumps(info))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test of the harness)")
    parser.add_argument("--reuse-world", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))

    def wanted(name: str) -> bool:
        return not only or name in only

    duration = 5.0 if args.quick else 20.0
    runs = 1 if args.quick else 3
    TMP.mkdir(parents=True, exist_ok=True)
    out_json = ROOT / "bench" / ("results.quick.json" if args.quick else "results.json")
    results: dict[str, Any] = {"machine": machine(), "benchmarks": {}}
    if only and out_json.exists():
        # A partial run updates the benchmarks it runs and keeps the others' last results.
        results["benchmarks"] = json.loads(out_json.read_text()).get("benchmarks", {})
    bench = results["benchmarks"]

    def save() -> None:
        """Written after every benchmark, so a failure late in the run keeps what was measured."""
        from bench.report import markdown

        out_json.write_text(json.dumps(results, indent=2, default=str))
        out_json.with_suffix(".md").write_text(markdown(results))

    if wanted("partitions"):
        from bench.partitions import run as partitions_run

        log("partitioned log: folded throughput with 1 and 2 aggregator processes, bulk import")
        bench["partitions"] = partitions_run(REDIS_URL, count=5_000 if args.quick else 20_000)
        save()
    if wanted("hot_window"):
        from bench.hot_window import run as hot_window_run

        log("hot window: Redis bytes per retained event, erasure with the log in Redis and archived")
        count = 25_000 if args.quick else 250_000
        bench["hot_window"] = hot_window_run(REDIS_URL, count, count // 5)
        save()
    if wanted("freshness"):
        from bench.freshness import run as freshness_run

        log("freshness at 5,000 events/s offered: API, 2 aggregator processes, Redis and load generator here")
        bench["freshness_5000"] = freshness_run(REDIS_URL, rate=5_000, duration=8 if args.quick else 20)
        save()
        log("freshness at 2,000 events/s offered (a rate this machine's 2 shared cores sustain)")
        bench["freshness_2000"] = freshness_run(REDIS_URL, rate=2_000, duration=8 if args.quick else 20)
        save()
    if only and only <= {"partitions", "hot_window", "freshness"}:
        return  # needs no demo world

    namespace, data_dir = "selbench", TMP / "world"
    log("building the 2,000-item demo world (1,000 visitors × 30 days) on Redis")
    world = build(
        namespace,
        data_dir,
        args.reuse_world,
        visitors=300 if args.quick else 1000,
        days=10 if args.quick else 30,
        seed=7,
    )
    bench["world"] = {k: v for k, v in world.items() if k not in ("visitors", "items")}
    save()
    bodies = recommend_bodies(TMP / "recommend.jsonl", world["visitors"])
    env = env_for(namespace, data_dir)

    if wanted("recommend"):
        with service("recommend", env, workers=2) as (url, process):
            load(f"{url}/v1/recommend", bodies, 100, 3)  # warm-up
            log("recommend at 200 req/s")
            scrape_before = get_text(f"{url}/metrics")
            bench["recommend_200rps"] = repeated(
                runs, lambda: load(f"{url}/v1/recommend", bodies, 200, duration, process=process)
            )
            bench["recommend_200rps"]["time_per_request_ms"] = time_per_request_ms(
                scrape_before, get_text(f"{url}/metrics")
            )
            sweep = []
            for rate in (300, 400, 500, 600, 800):
                log(f"recommend saturation at {rate} req/s")
                outcome = load(f"{url}/v1/recommend", bodies, rate, duration / 2, process=process)
                sweep.append(outcome)
                if outcome["p99_ms"] > 250 or outcome["errors"]:
                    break
            ok = [s["offered_rate"] for s in sweep if s["p99_ms"] <= 50 and not s["errors"]]
            bench["recommend_saturation"] = {"sweep": sweep, "max_rate_with_p99_le_50ms": max(ok) if ok else None}
            bench["recommend_200rps"]["rss"] = rss_mb(process)
            log("our service at 30 req/s (same rate as the naive baseline)")
            bench["recommend_30rps"] = repeated(
                runs, lambda: load(f"{url}/v1/recommend", bodies, 30, duration, process=process)
            )
            save()

    if wanted("naive"):
        with service("recommend", {**env, "RECOMMEND_NAIVE_ITEM_FEATURES": "true"}, workers=2) as (url, _):
            load(f"{url}/v1/recommend", bodies, 5, 3)
            log("naive baseline (Feast SDK fetch of candidate features per request) at 30 req/s")
            bench["naive_30rps"] = repeated(runs, lambda: load(f"{url}/v1/recommend", bodies, 30, duration))
            # 30 req/s overloads the naive service; at 5 req/s it is not, so the ratio there is its cost alone.
            log("naive baseline at 5 req/s")
            bench["naive_5rps"] = repeated(runs, lambda: load(f"{url}/v1/recommend", bodies, 5, duration))
        with service("recommend", env, workers=2) as (url, _):
            load(f"{url}/v1/recommend", bodies, 50, 3)
            log("our service at 5 req/s")
            bench["recommend_5rps"] = repeated(runs, lambda: load(f"{url}/v1/recommend", bodies, 5, duration))
        for rate_label in ("30rps", "5rps"):
            ours, naive = bench.get(f"recommend_{rate_label}"), bench[f"naive_{rate_label}"]
            if ours:
                bench[f"naive_ratio_{rate_label}"] = {
                    "p99_ratio": round(naive["median_p99_ms"] / ours["median_p99_ms"], 1),
                    "p50_ratio": round(naive["median_p50_ms"] / ours["median_p50_ms"], 1),
                }
        save()

    if wanted("ingest"):
        skip_leftover_events(namespace)
        with service("profile", env) as (url, _):
            warm = event_bodies(TMP / "events-warm.jsonl", world["visitors"], world["items"], 60, label="warm")
            wait_drained(url, 120)
            load(f"{url}/v1/events", warm, 20, 3)
            wait_drained(url, 60)
            sweep = []
            for rate in (10, 50, 100, 200):
                batches = event_bodies(
                    TMP / "events.jsonl", world["visitors"], world["items"], int(rate * duration / 2), label=str(rate)
                )
                before_text = get_text(f"{url}/metrics")
                _, before = histogram_quantile(before_text, "selaras_feature_write_lag_seconds", 0.99)
                folded_before = counter_value(before_text, "selaras_events_aggregated_total")
                log(f"ingestion at {rate * 100} events/s (batches of 100)")
                started = time.monotonic()
                outcome = load(f"{url}/v1/events", batches, rate, duration / 2, connections=32)
                accepted = (outcome["requests"] - outcome["errors"]) * 100
                drained = wait_folded(url, folded_before + accepted, 180)
                after_text = get_text(f"{url}/metrics")
                lag_p99, _ = histogram_quantile(after_text, "selaras_feature_write_lag_seconds", 0.99, before)
                lag_p50, _ = histogram_quantile(after_text, "selaras_feature_write_lag_seconds", 0.5, before)
                outcome["events_per_s"] = round(
                    outcome["achieved_rate"] * 100 * (1 - outcome["errors"] / max(outcome["requests"], 1)), 1
                )
                # The aggregator's own pace: events folded into features per second until it caught up.
                outcome["folded_per_s"] = round(accepted / (drained - started), 1) if drained else None
                outcome["freshness_p50_s_le"] = lag_p50
                outcome["freshness_p99_s_le"] = lag_p99
                sweep.append(outcome)
            bench["ingest_batches_of_100"] = {"sweep": sweep}
            save()

    if wanted("catalog100k"):
        namespace_big, big_dir = "selbench100k", TMP / "world100k"
        log("building the 100,000-item world")
        big = build(namespace_big, big_dir, args.reuse_world, visitors=200, days=5, seed=9, n_products=100_000)
        bench["world_100k"] = {k: v for k, v in big.items() if k not in ("visitors", "items")}
        big_bodies = recommend_bodies(TMP / "recommend100k.jsonl", big["visitors"])
        with service("recommend", env_for(namespace_big, big_dir), workers=2) as (url, process):
            load(f"{url}/v1/recommend", big_bodies, 50, 3)
            log("100k catalog at 200 req/s")
            bench["catalog_100k_200rps"] = repeated(
                runs, lambda: load(f"{url}/v1/recommend", big_bodies, 200, duration)
            )
            bench["catalog_100k_200rps"]["rss"] = rss_mb(process)
            save()

    if wanted("training"):
        from bench.training_bench import train_on_impressions

        log("training on 1,000,000 logged impressions")
        bench["training_1m_impressions"] = train_on_impressions(
            REDIS_URL, TMP / "train1m", impressions=100_000 if args.quick else 1_000_000
        )
        save()

    if wanted("nbm"):
        try:
            from bench.nbm_bench import nbm_batch
        except ImportError:
            bench["nbm_batch_1000"] = {"skipped": "next-best-message batch endpoint not available"}
        else:
            # Marketing consent by default (opt-out) so answers reach the model instead of short-cutting.
            with service("recommend", {**env, "SELARAS_CONSENT_MARKETING": "opt_out"}, workers=2) as (url, _):
                log("next-best-message batches of 1,000")
                bench["nbm_batch_1000"] = nbm_batch(url, world["visitors"], runs=runs)

    save()
    log(f"wrote {out_json} and {out_json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
