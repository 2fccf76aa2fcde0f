"""Shared fixtures: real Redis (REDIS_URL from `make test`), private redis-servers, isolated settings and a
small demo world built once per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis

import services  # noqa: F401  (fixes prometheus_client's mode before Feast is imported)
from services.common.clock import Clock, OffsetClock
from services.common.settings import CommonSettings
from services.profile.settings import ProfileSettings
from services.recommend.settings import RecommendSettings

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shift-clock-days",
        type=float,
        default=0.0,
        help="Run with this process's wall clock shifted by N days (time-machine): a test that passes only on "
        "some calendar dates depends on the wall clock instead of the business clock it sets.",
    )


_TRAVELLER: Any = None


def pytest_configure(config: pytest.Config) -> None:
    global _TRAVELLER
    days = config.getoption("--shift-clock-days")
    if days:
        import time_machine

        # Shifted once for the whole run and still ticking: every wall-clock read in the process moves by the
        # same offset (Redis, outside the process, only ever sees durations: TTLs).
        _TRAVELLER = time_machine.travel(time.time() + days * 86_400.0, tick=True)
        _TRAVELLER.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _TRAVELLER is not None:
        _TRAVELLER.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass (True if it held)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A private redis-server process (for tests that stop, kill or restart Redis)."""

    port: int
    directory: Path
    appendonly: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, kill: bool = False) -> None:
        if self.process is not None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis", appendonly=True)
    server.directory.mkdir()
    server.start()
    yield server
    server.stop(kill=True)


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


_PENDING_CLEANUP: dict[str, set[str]] = {}


def copy_keys(
    source: redis.Redis, target: redis.Redis, pattern: str, rename: Callable[[bytes], bytes] = lambda key: key
) -> int:
    """Copy the keys matching `pattern` with DUMP/RESTORE (values, types and all), optionally renamed."""
    copied = 0
    keys = list(source.scan_iter(match=pattern, count=5000))
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        read = source.pipeline(transaction=False)
        for key in chunk:
            read.dump(key)
        write = target.pipeline(transaction=False)
        for key, dumped in zip(chunk, read.execute(), strict=True):
            if dumped is not None:
                write.restore(rename(key), 0, dumped, replace=True)
                copied += 1
        write.execute()
    return copied


def clean_namespace(url: str, namespace: str) -> None:
    """Forget a test's keys at the end of the session (one pass over Redis for all namespaces: a SCAN per
    test cost seconds each on a Redis shared with other runs)."""
    _PENDING_CLEANUP.setdefault(url, set()).add(namespace)


def purge_namespaces(url: str, namespaces: set[str]) -> None:
    # Our keys start with the namespace ("{ns:log}" for the stream); Feast's online rows end with the project
    # name, which the fixtures set to the namespace.
    heads = tuple(f"{ns}:".encode() for ns in namespaces) + tuple(f"{{{ns}:".encode() for ns in namespaces)
    tails = tuple(ns.encode() for ns in namespaces)
    client = redis.Redis.from_url(url, socket_timeout=30)
    doomed = [key for key in client.scan_iter(count=10_000) if key.startswith(heads) or key.endswith(tails)]
    for start in range(0, len(doomed), 1000):
        client.delete(*doomed[start : start + 1000])
    client.close()


@pytest.fixture(scope="session", autouse=True)
def _purge_test_keys_at_exit() -> Iterator[None]:
    yield
    for url, namespaces in _PENDING_CLEANUP.items():
        with contextlib.suppress(redis.RedisError):
            purge_namespaces(url, namespaces)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Builds isolated settings (own data dir, Redis namespace and Feast project) for any service."""
    made: list[tuple[str | None, str]] = []

    def make(kind: type[CommonSettings] = CommonSettings, redis_url: str | None = REDIS_URL, **overrides: Any) -> Any:
        namespace = overrides.pop("namespace", unique_name("t"))
        values: dict[str, Any] = {
            "data_dir": overrides.pop("data_dir", tmp_path / "data"),
            "redis_url": redis_url,
            "namespace": namespace,
            "feast_project": overrides.pop("feast_project", namespace),
            "environment": "test",
        }
        values.update(overrides)
        made.append((redis_url, namespace))
        return kind(**values)

    yield make
    for url, namespace in made:
        if url:
            with contextlib.suppress(redis.RedisError):
                clean_namespace(url, namespace)


@pytest.fixture
def profile_settings(settings_factory: Callable[..., Any]) -> ProfileSettings:
    settings: ProfileSettings = settings_factory(ProfileSettings, aggregator_idle_s=0.01)
    return settings


@pytest.fixture
def recommend_settings_for(
    settings_factory: Callable[..., Any],
) -> Callable[[CommonSettings], RecommendSettings]:
    """Recommend settings that share data dir, namespace and Feast project with the given settings."""

    def make(shared: CommonSettings, **overrides: Any) -> RecommendSettings:
        values = {
            "data_dir": shared.data_dir,
            "redis_url": shared.redis_url,
            "namespace": shared.namespace,
            "feast_project": shared.feast_project,
            "environment": "test",
            "refresh_interval_s": 0.5,
        }
        values.update(overrides)
        return RecommendSettings(**values)

    return make


# ------------------------------------------------------------------------------------------------------
# A small demo world, built once per test session on real Redis (import + training take a while).
# Tests only read it: later tests assert on the world as built (the persona job's counts and visitors), so a
# module that sends events, logs impressions or changes the catalog serves `world_fork`, a copy of its own.
# ------------------------------------------------------------------------------------------------------

WORLD_VISITORS = 300
WORLD_DAYS = 14
# The world's history ends at a fixed moment, never "today": simulated behaviour depends on the calendar
# (paydays, weekends), so a world ending today made the suite's results change with the date it ran on.
WORLD_END = datetime(2026, 11, 29, 21, tzinfo=timezone(timedelta(hours=7)))


@dataclass
class SessionWorld:
    settings: CommonSettings
    world: Any
    # Business time for everything served from the world: it starts at the history's end and runs at wall
    # speed. In-process services get it (`create_app(settings, world.clock)`), tests take times from it.
    clock: Clock


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionWorld]:
    from services.demo.world import build_world
    from services.recommend.training.train import TrainConfig

    namespace = unique_name("w")
    settings = CommonSettings(
        data_dir=tmp_path_factory.mktemp("world"),
        redis_url=REDIS_URL,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
    )
    built = build_world(
        settings,
        visitors=WORLD_VISITORS,
        days=WORLD_DAYS,
        seed=11,
        end=WORLD_END,
        train_config=TrainConfig(seed=11, max_queries=4000),
    )
    yield SessionWorld(settings, built, OffsetClock(WORLD_END))
    clean_namespace(REDIS_URL, namespace)
    shutil.rmtree(settings.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def world_fork(world: SessionWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CommonSettings]:
    """A copy of the session's world (own namespace, Feast project and data dir) for one test module to change:
    the simulated traffic, the personas job. Its data dir is `<directory>/data`; the module may keep other
    files in that directory, which goes with the copy."""
    from services.demo.simulate_ab import fork_world

    directory = tmp_path_factory.mktemp("fork")
    namespace = unique_name("fork")
    fork = CommonSettings(
        data_dir=directory / "data",
        redis_url=REDIS_URL,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
    )
    clean_namespace(REDIS_URL, namespace)
    simulator = world.world.simulator
    fork_world(
        world.settings, fork, [v.visitor_id for v in simulator.visitors], [p.item_id for p in simulator.shop.products]
    )
    try:
        yield fork
    finally:
        clean_namespace(REDIS_URL, namespace)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["redis", "sqlite"])
def profile_and_recommend(
    request: pytest.FixtureRequest, settings_factory: Callable[..., Any]
) -> Iterator[tuple[Any, Any]]:
    """A profile and a recommend repository on one store, for each backend: Redis (+ Feast on Redis) and
    embedded SQLite (+ Feast on SQLite). The profile side writes what the aggregator and the consent API would."""
    from services.profile.repository import ProfileRepository
    from services.recommend.repository import RecommendRepository

    settings = settings_factory(ProfileSettings, redis_url=REDIS_URL if request.param == "redis" else None)
    profile = ProfileRepository.open(settings)
    recommend = RecommendRepository.open(settings)
    try:
        yield profile, recommend
    finally:
        recommend.close()
        profile.close()
