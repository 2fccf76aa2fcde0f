"""Both services and the Feast online store on a real 3-master Redis Cluster (loopback ports).

The cluster is made the way an operator makes one: three `redis-server --cluster-enabled yes` processes joined
with `redis-cli --cluster create`. A small demo world is imported and trained on it, then the end-to-end
ingest -> recommend path runs against it.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from redis.cluster import RedisCluster

from services.common.settings import CommonSettings
from services.common.storage import Namespace, PendingEvent, RedisStore, open_store
from services.demo.world import World, build_world
from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings
from services.recommend.training.train import TrainConfig
from tests.conftest import unique_name

SLOTS = [
    {"name": "home", "kind": "product", "count": 12},
    {"name": "hero", "kind": "banner", "count": 1},
]


@dataclass
class LocalRedisCluster:
    """Three masters, no replicas, on free loopback ports."""

    directory: Path
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, masters: int = 3) -> None:
        self.ports = cluster_ports(masters)
        for port in self.ports:
            node_dir = self.directory / str(port)
            node_dir.mkdir(parents=True)
            args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
            args += ["--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no", "--dir", str(node_dir)]
            self.processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_until(lambda port=port: _pings(port), 10, f"node {port} did not start")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(self._converged, 30, "the cluster did not reach cluster_state:ok on every node")

    def _converged(self) -> bool:
        for port in self.ports:
            info = redis.Redis(port=port, socket_timeout=1).cluster("info")
            state = info.get("cluster_state") if isinstance(info, dict) else None
            if state not in ("ok", b"ok"):
                return False
        return True

    def node_key_counts(self) -> list[int]:
        return [int(redis.Redis(port=port, socket_timeout=1).dbsize()) for port in self.ports]

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(10)


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free and valid too (an OS-chosen port may be > 55535)."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        port = rng.randrange(20000, 45000)
        if port not in ports and all(bindable(p) for p in (port, port + 10000)):
            ports.append(port)
    return ports


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def wait_until(predicate: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(message)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class ClusterWorld:
    settings: CommonSettings
    world: World


@pytest.fixture(scope="module")
def cluster_world(redis_cluster: LocalRedisCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterWorld]:
    namespace = unique_name("c")
    settings = CommonSettings(
        data_dir=tmp_path_factory.mktemp("cluster-world"),
        redis_url=redis_cluster.url,
        redis_cluster=True,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
    )
    # Small on purpose (a few seconds of import, ~15 s of training): the point is the cluster, not the model.
    config = TrainConfig(seed=5, max_queries=1200, snapshot_step_s=12 * 3600, num_boost_round=80)
    world = build_world(settings, visitors=150, days=7, seed=5, train_config=config)
    yield ClusterWorld(settings, world)
    shutil.rmtree(settings.data_dir, ignore_errors=True)


def test_store_keeps_the_log_and_its_idempotency_keys_in_one_slot(redis_cluster: LocalRedisCluster) -> None:
    settings = CommonSettings(
        redis_url=redis_cluster.url, redis_cluster=True, namespace=unique_name("s"), environment="test"
    )
    store = open_store(settings)
    assert isinstance(store, RedisStore) and isinstance(store.client, RedisCluster)
    try:
        events = [PendingEvent(f"e{i}", f"v{i % 7}", f"payload-{i}".encode()) for i in range(50)]
        first = store.append_events(events)
        again = store.append_events([*events[:20], PendingEvent("new", "v1", b"payload-new")])
        assert (first.accepted, first.duplicates) == (50, 0)
        assert (again.accepted, again.duplicates, again.accepted_ids) == (1, 20, ("new",))
        assert [e.payload for e in store.read_events(None, 100, store.partition_of("v1"))][-1] == b"payload-new"
        assert store.log_length() == 51

        client = store.client
        for partition in range(store.partitions):
            mine = [e for e in events if store.partition_of(e.visitor_id) == partition]
            slots = {client.keyslot(store.stream_of(partition))} | {
                client.keyslot(store._seen_key(e.event_id, partition)) for e in mine
            }
            assert len(slots) == 1, "the append script's keys (one partition's) must share one slot"
        partition_slots = {client.keyslot(store.stream_of(p)) for p in range(store.partitions)}
        assert len(partition_slots) == store.partitions, "each partition is its own slot (spread over the nodes)"

        # Shared records merged across slots: each key with its applied marker, added once.
        def add_once(key: str, value: bytes | None, marker: bytes | None) -> tuple[bytes, bytes] | None:
            return None if marker else (str(int(value or b"0") + 1).encode(), b"done")

        keys = [f"m{i}" for i in range(40)]
        store.merge_many("shared", keys, add_once)
        assert store.merge_many("shared", keys, add_once) == {k: b"1" for k in keys}

        # Blobs are spread over the masters; multi-key reads, writes and deletes still work across slots.
        values = {f"k{i}": f"v{i}".encode() for i in range(200)}
        store.put_many(Namespace.META, values)
        assert len({client.keyslot(store._blob_key(Namespace.META, k)) for k in values}) > 100
        assert store.get_many(Namespace.META, list(values)) == list(values.values())
        assert dict(store.scan(Namespace.META)) == values
        assert store.delete(Namespace.META, list(values)[:50]) == 50
        assert store.get_many(Namespace.META, ["k0", "k199"]) == [None, b"v199"]
        store.forget_event_ids(["e0", "e7"], "v0")
        assert store.append_events([events[0], events[7]]).accepted == 2

        # The archiver's and the repartition tool's calls: the stream clock (every node answers TIME), an exact
        # trim of one partition, idempotency keys moved to another partition's slot with their TTL.
        partition = store.partition_of("v1")
        entries = store.read_events(None, 100, partition)
        assert all(int(e.position.split("-")[0]) <= store.log_time() * 1000 for e in entries)
        assert store.trim_log(partition, entries[1].position) == 2
        assert [e.position for e in store.read_events(None, 100, partition)] == [e.position for e in entries[2:]]
        target = (partition + 1) % store.partitions
        moves = [(store.seen_key("e1", partition), store.seen_key("e1", target))]
        assert store.move_expiring_keys(moves) == 1
        assert client.get(moves[0][0]) is None and 0 < client.pttl(moves[0][1]) <= store.dedupe_ttl_s * 1000
    finally:
        store.close()


def test_the_world_is_spread_over_every_master(cluster_world: ClusterWorld, redis_cluster: LocalRedisCluster) -> None:
    counts = redis_cluster.node_key_counts()
    assert all(count > 100 for count in counts), counts
    assert cluster_world.world.model_version is not None
    assert cluster_world.world.train_metrics["train_queries"] > 100


@pytest.fixture(scope="module")
def clients(cluster_world: ClusterWorld) -> Iterator[tuple[TestClient, TestClient]]:
    shared = cluster_world.settings
    common: dict[str, Any] = {
        "data_dir": shared.data_dir,
        "redis_url": shared.redis_url,
        "redis_cluster": True,
        "namespace": shared.namespace,
        "feast_project": shared.feast_project,
        "environment": "test",
    }
    profile = ProfileSettings(**common, aggregator_idle_s=0.005)
    recommend = RecommendSettings(**common, refresh_interval_s=0.5)
    with (
        TestClient(create_profile_app(profile)) as profile_client,
        TestClient(create_recommend_app(recommend)) as recommend_client,
    ):
        yield profile_client, recommend_client


def recommend(client: TestClient, visitor: str, **extra: Any) -> dict[str, Any]:
    body = {"visitor_id": visitor, "context": {"device": "mobile", "city": "Jakarta"}, "slots": SLOTS, **extra}
    response = client.post("/v1/recommend", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.slow
def test_services_are_ready_and_personalize_on_the_cluster(
    clients: tuple[TestClient, TestClient], cluster_world: ClusterWorld
) -> None:
    profile, client = clients
    assert profile.get("/readyz").json()["store"] is True
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["model_version"] == cluster_world.world.model_version
    known = cluster_world.world.simulator.visitors[0].visitor_id
    body = recommend(client, known)
    assert (body["strategy"], body["fallback"]) == ("personalized", False)
    assert len(body["slots"][0]["items"]) == 12


@pytest.mark.slow
def test_viewing_a_category_ranks_it_higher_within_one_second_on_the_cluster(
    clients: tuple[TestClient, TestClient], cluster_world: ClusterWorld
) -> None:
    profile, client = clients
    shop = cluster_world.world.shop
    visitor = cluster_world.world.simulator.visitors[3].visitor_id
    before = recommend(client, visitor)["slots"][0]["items"]
    shown = {item["category"] for item in before}
    category = next(p.category for p in shop.products if p.category not in shown and p.in_stock)
    items = [p for p in shop.products if p.category == category and p.in_stock][:6]
    now = datetime.now(UTC)
    events = [
        {
            "event_id": f"cluster-e2e-{visitor}-{i}",
            "visitor_id": visitor,
            "type": "product_view",
            "item_id": item.item_id,
            "price": item.price,
            "timestamp": (now + timedelta(seconds=i)).isoformat(),
            "context": {"device": "mobile", "city": "Jakarta", "session_id": "cluster-e2e"},
        }
        for i, item in enumerate(items)
    ]
    acknowledged = time.monotonic()
    response = profile.post("/v1/events", json={"events": events})
    assert response.status_code == 202 and response.json() == {"accepted": 6, "duplicates": 0}
    count_before = sum(item["category"] == category for item in before)
    count_after = count_before
    while time.monotonic() - acknowledged < 1.0:
        after = recommend(client, visitor, context={"device": "mobile", "city": "Jakarta", "now": now.isoformat()})
        count_after = sum(item["category"] == category for item in after["slots"][0]["items"])
        if count_after > count_before:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - acknowledged
    assert count_after > count_before, f"{category}: {count_before} -> {count_after}"
    assert elapsed < 1.0
    # A re-sent batch is recognised on the cluster too (the idempotency keys live with the stream).
    assert profile.post("/v1/events", json={"events": events}).json() == {"accepted": 0, "duplicates": 6}
