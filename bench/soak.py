"""Soak: both services as real processes on Redis, a fixed request rate for a long time, memory and errors.

`make soak` runs `python -m bench.soak` with REDIS_URL set (10 minutes by default). It builds a small demo world
in its own namespace, starts `selaras serve profile` and `selaras serve recommend`, then sends an open-loop load
(requests are scheduled at a fixed rate whatever the latency, like real traffic): `POST /v1/recommend` for
known and new visitors, and `POST /v1/events` batches. The RSS of each service is sampled every few seconds.

By default the soak starts its own redis-server (AOF, `appendfsync always`, as in production) so that the
figures measure Selaras and not whatever else lives in a shared Redis; `--use-redis-url` runs on REDIS_URL.

Passes when no request failed and no service grew by 10% or more (mean RSS of the last minute against the
first minute after a warm-up). Figures go to bench/soak.json; the exit code is 1 when it did not pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import redis

REPO = Path(__file__).resolve().parents[1]
CITIES = ["Jakarta", "Surabaya", "Bandung", "Medan", "Makassar", "Denpasar"]
DEVICES = ["mobile", "desktop", "tablet"]
SLOTS = [
    {"name": "home", "kind": "product", "count": 12},
    {"name": "hero", "kind": "banner", "count": 1},
    {"name": "cta", "kind": "cta", "count": 2},
]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        """Resident memory of the service and its children (uvicorn workers), bytes."""
        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"recommend": [], "events": []})
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    late: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)
            if error:
                self.errors[f"{kind}:{error}"] = self.errors.get(f"{kind}:{error}", 0) + 1


def start_service(name: str, env: dict[str, str], log_dir: Path) -> Service:
    port = free_port()
    log = (log_dir / f"{name}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", name, "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    service = Service(name, port, process)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start; see {log_dir / (name + '.log')}")
        try:
            if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.terminate()
    process.wait(30)
    raise RuntimeError(f"{name} was not ready in 300 s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server configured as in production (AOF, fsync on every write)."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)]
    args += ["--appendonly", "yes", "--appendfsync", "always"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url, socket_timeout=0.5).ping():
                return process, url
        except redis.RedisError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("redis-server did not start")


def clean_namespace(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    for pattern in (f"{namespace}:*", f"{{{namespace}:*", f"*{namespace}"):
        keys = list(client.scan_iter(match=pattern, count=5000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    client.close()


class Soak:
    def __init__(self, args: argparse.Namespace, profile: Service, recommend: Service, visitors: list[str]):
        self.args = args
        self.profile = profile
        self.recommend = recommend
        self.visitors = visitors
        self.stats = Stats()
        self.rng = random.Random(args.seed)
        self._local = threading.local()
        self._event_ids = iter(range(10**12))
        self._ids_lock = threading.Lock()

    def client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            # Idle connections are dropped before the server's keep-alive timeout (uvicorn: 5 s) closes them:
            # otherwise a request can race the close and fail with a read error that no server caused.
            client = self._local.client = httpx.Client(timeout=5, limits=httpx.Limits(keepalive_expiry=2.0))
        return client

    def _post(self, kind: str, url: str, payload: Any, expected: int) -> None:
        started = time.perf_counter()
        error = None
        try:
            response = self.client().post(
                url, content=orjson.dumps(payload), headers={"content-type": "application/json"}
            )
            if response.status_code != expected:
                error = str(response.status_code)
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        self.stats.record(kind, time.perf_counter() - started, error)

    def recommend_once(self) -> None:
        # Mostly known visitors, some first-time ones (they take the popular-in-context path).
        visitor = self.rng.choice(self.visitors) if self.rng.random() < 0.8 else f"soak-new-{self.rng.randrange(500)}"
        context = {"device": self.rng.choice(DEVICES), "city": self.rng.choice(CITIES), "channel": "web"}
        payload = {"visitor_id": visitor, "context": context, "slots": SLOTS}
        self._post("recommend", f"{self.recommend.url}/v1/recommend", payload, 200)

    def ingest_once(self) -> None:
        now = datetime.now(UTC).isoformat()
        with self._ids_lock:
            ids = [next(self._event_ids) for _ in range(self.args.batch)]
        events = []
        for n in ids:
            visitor = self.rng.choice(self.visitors)
            events.append(
                {
                    "event_id": f"soak-{self.args.run_id}-{n}",
                    "visitor_id": visitor,
                    "type": self.rng.choice(["product_view", "product_view", "product_view", "add_to_cart"]),
                    "item_id": self.rng.choice(self.args.item_ids),
                    "timestamp": now,
                    "context": {"device": self.rng.choice(DEVICES), "city": self.rng.choice(CITIES)},
                }
            )
        self._post("events", f"{self.profile.url}/v1/events", {"events": events}, 202)

    def run(self) -> dict[str, Any]:
        args = self.args
        services = (self.profile, self.recommend)
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append({"t": round(time.monotonic() - started, 1), **{s.name: s.rss() for s in services}})
                stop.wait(args.sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # Open loop: each tick is scheduled at a fixed time; a slow answer does not slow the next request.
        schedule: list[tuple[float, str]] = []
        schedule += [(i / args.rate, "recommend") for i in range(int(args.duration * args.rate))]
        schedule += [(i / args.ingest_rate, "events") for i in range(int(args.duration * args.ingest_rate))]
        schedule.sort()
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            for at, kind in schedule:
                delay = started + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -1.0:
                    self.stats.late += 1  # the load generator itself fell behind (reported, not an error)
                pool.submit(self.recommend_once if kind == "recommend" else self.ingest_once)
                self.stats.sent += 1
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join(5)
        return self.report(samples, elapsed)

    def report(self, samples: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
        args = self.args
        memory: dict[str, Any] = {}
        for name in ("profile", "recommend"):
            baseline = [s[name] for s in samples if args.warmup_s <= s["t"] < args.warmup_s + 60]
            last = [s[name] for s in samples if s["t"] >= samples[-1]["t"] - 60]
            base, end = sum(baseline) / max(len(baseline), 1), sum(last) / max(len(last), 1)
            memory[name] = {
                "baseline_mb": round(base / 2**20, 1),
                "last_minute_mb": round(end / 2**20, 1),
                "max_mb": round(max(s[name] for s in samples) / 2**20, 1),
                "growth_pct": round(100 * (end - base) / base, 2) if base else None,
            }
        latency = {
            kind: {
                "requests": len(values),
                "p50_ms": round(1000 * percentile(values, 0.5), 2),
                "p99_ms": round(1000 * percentile(values, 0.99), 2),
                "max_ms": round(1000 * max(values, default=float("nan")), 2),
            }
            for kind, values in self.stats.latencies.items()
        }
        errors = sum(self.stats.errors.values())
        growth_ok = all((m["growth_pct"] or 0) < 10 for m in memory.values())
        return {
            "passed": errors == 0 and growth_ok,
            "duration_s": round(elapsed, 1),
            "rate": {"recommend_per_s": args.rate, "event_batches_per_s": args.ingest_rate, "batch": args.batch},
            "requests": self.stats.sent,
            "errors": errors,
            "error_kinds": self.stats.errors,
            "late_ticks": self.stats.late,
            "latency": latency,
            "memory": memory,
            "rss_samples_mb": [
                {"t": s["t"], "profile": round(s["profile"] / 2**20, 1), "recommend": round(s["recommend"] / 2**20, 1)}
                for s in samples[:: max(1, len(samples) // 60)]
            ],
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "redis": "REDIS_URL" if args.use_redis_url else "private redis-server, AOF appendfsync always",
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--rate", type=float, default=40.0, help="recommend requests per second")
    parser.add_argument("--ingest-rate", type=float, default=5.0, help="event batches per second")
    parser.add_argument("--batch", type=int, default=10, help="events per batch")
    parser.add_argument("--threads", type=int, default=16, help="client threads")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="excluded from the memory baseline")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    parser.add_argument("--visitors", type=int, default=300)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "soak.json")
    parser.add_argument("--use-redis-url", action="store_true", help="run on REDIS_URL instead of a private Redis")
    args = parser.parse_args(argv)
    redis_url = os.environ.get("REDIS_URL")
    if args.use_redis_url and not redis_url:
        parser.error("--use-redis-url needs REDIS_URL")
    args.warmup_s = min(args.warmup_s, max(args.duration - 120, 0.0))
    args.run_id = uuid.uuid4().hex[:8]

    import services  # noqa: F401  (prometheus mode, before Feast)
    from services.common.settings import CommonSettings
    from services.demo.world import build_world
    from services.recommend.training.train import TrainConfig

    namespace = f"soak{args.run_id}"
    work = REPO / "bench" / "tmp" / namespace
    work.mkdir(parents=True, exist_ok=True)
    private_redis = None
    if not args.use_redis_url:
        private_redis, redis_url = start_redis(work / "redis")
    assert redis_url
    settings = CommonSettings(
        data_dir=work / "data", redis_url=redis_url, namespace=namespace, feast_project=namespace, environment="test"
    )
    print(f"building a demo world ({args.visitors} visitors, {args.days} days) in namespace {namespace}")
    world = build_world(
        settings,
        visitors=args.visitors,
        days=args.days,
        seed=args.seed,
        train_config=TrainConfig(seed=args.seed, max_queries=1500, snapshot_step_s=12 * 3600),
    )
    args.item_ids = [p.item_id for p in world.shop.products]
    visitors = [v.visitor_id for v in world.simulator.visitors]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_MULTIPROC", "prometheus_multiproc"))}
    env.update(
        {
            "SELARAS_DATA_DIR": str(settings.data_dir),
            "REDIS_URL": redis_url,
            "SELARAS_NAMESPACE": namespace,
            "SELARAS_FEAST_PROJECT": namespace,
            "SELARAS_ENVIRONMENT": "test",
        }
    )
    started: list[Service] = []
    try:
        started.append(start_service("profile", env, work))
        started.append(start_service("recommend", env, work))
        profile, recommend = started
        print(f"soaking for {args.duration:.0f} s: {args.rate}/s recommend, {args.ingest_rate}/s event batches")
        report = Soak(args, profile, recommend, visitors).run()
    finally:
        # Whatever happened (a service that never got ready included), no process is left behind.
        for service in started:
            service.process.send_signal(signal.SIGTERM)
        for service in started:
            try:
                service.process.wait(30)
            except subprocess.TimeoutExpired:
                service.process.kill()
        if private_redis is not None:
            private_redis.terminate()
            private_redis.wait(30)
        else:
            clean_namespace(redis_url, namespace)
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("passed", "requests", "errors", "latency", "memory")}, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
