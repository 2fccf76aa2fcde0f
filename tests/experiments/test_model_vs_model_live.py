"""Model vs model, live: two recommend replicas (uvicorn processes) share one Redis namespace and serve two ranker
versions as the two arms of one experiment. While threads send traffic to both replicas, the arms' weights are
ramped and then the challenger is promoted through the admin API. No request fails, no replica restarts, an
exposed visitor keeps their arm on both replicas and across the weight change, after the promotion everybody
gets the winner's model, and the report counts exactly the distinct visitors the traffic exposed. Which weight
changes a running experiment accepts: exactly those that move no assigned visitor (checked over 5,000 ids)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import lightgbm as lgb
import numpy as np
import pytest

from services.common.clock import DataClock
from services.common.events import EventType
from services.common.models import ModelKind, ModelRegistry
from services.demo.world import ingest_events
from services.experiments.assignment import assign
from services.experiments.config import ExperimentConfig
from services.experiments.endpoints import keeps_assigned
from services.experiments.runtime import CONFIG_POLL_S
from services.features import schema as F
from services.features.aggregations import SegmentRules
from services.profile.aggregator.worker import Aggregator
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from services.recommend.ranking.ranker import ModelMeta
from services.recommend.repository import RecommendRepository
from tests.conftest import free_port
from tests.deploy.test_prometheus_experiments import start_process
from tests.factories import make_event, make_item

KEY = "rank-v2"
SLOTS = [{"name": "home", "kind": "product", "count": 4}]
# Phase 1 visitors are exposed before the ramp; phase 2 visitors arrive after it (the ramp adds coverage).
FIRST, LATER = [f"lv-{i:03d}" for i in range(80)], [f"lv-{i:03d}" for i in range(80, 140)]
MODELS = {"control": "v1", "treatment": "v2"}
# Business time of the visitors' history: a fixed past moment (the replicas run on the wall clock, and nothing
# asserted here depends on the distance between the two).
HISTORY = datetime(2026, 3, 1, 10, tzinfo=UTC)


def booster(seed: int) -> bytes:
    """A small LightGBM ranker over the served features (two seeds, two different models)."""
    names = list(F.RANKER_FEATURES)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(2000, len(names)))
    X[:, names.index("i_category_code")] = rng.integers(0, 30, size=len(X))
    y = (X[:, seed % 5] + rng.normal(size=len(X)) > 1).astype(float)
    params = {"objective": "lambdarank", "num_leaves": 7, "verbosity": -1, "num_threads": 1, "min_data_in_leaf": 20}
    data = lgb.Dataset(X, label=y, group=[50] * 40, feature_name=names, categorical_feature=["i_category_code"])
    return lgb.train(params, data, num_boost_round=20).model_to_string().encode()


@dataclass
class Answer:
    visitor: str
    replica: int
    phase: str
    status: int
    arm: str | None = None
    model: str | None = None
    done: float = 0.0  # perf_counter when the answer arrived


@dataclass
class Replicas:
    urls: list[str]
    processes: list[subprocess.Popen[bytes]]
    answers: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ask(self, client: httpx.Client, replica: int, visitor: str, phase: str) -> Answer:
        body = {"visitor_id": visitor, "slots": SLOTS, "context": {"device": "mobile"}}
        response = client.post(f"{self.urls[replica]}/v1/recommend", json=body)
        answer = Answer(visitor, replica, phase, response.status_code, done=time.perf_counter())
        if response.status_code == 200:
            data = response.json()
            answer.arm = data["experiment"]["arm"] if data["experiment"] else None
            answer.model = data["model_version"]
        with self.lock:
            self.answers.append(answer)
        return answer

    def answered(self, visitors: list[str], since: float) -> bool:
        """Whether every one of `visitors` got an answer after `since` (a perf_counter time)."""
        with self.lock:
            seen = {a.visitor for a in self.answers if a.done > since}
        return seen >= set(visitors)

    def admin(self, replica: int, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = httpx.request(method, f"{self.urls[replica]}{path}", json=body, timeout=30)
        assert response.status_code in (200, 201), response.text
        data: dict[str, Any] = response.json()
        return data


def history(settings: ProfileSettings) -> None:
    """The catalog and the visitors' history (so the models rank them), through the real ingest and fold, and
    the two ranker versions: v1 in production, v2 the challenger."""
    repository = ProfileRepository.open(settings)
    try:
        repository.upsert_catalog([make_item(item_id=f"p{i:03d}", category=f"cat-{i % 4}") for i in range(30)])
        events = [
            make_event(
                event_id=f"h-{visitor}-{n}",
                visitor_id=visitor,
                type=EventType.PRODUCT_VIEW,
                item_id=f"p{(i * 7 + n) % 30:03d}",
                timestamp=HISTORY + timedelta(minutes=i + n),
            )
            for i, visitor in enumerate(FIRST + LATER)
            for n in range(2)
        ]
        rules = SegmentRules.from_settings(settings)
        ingest_events(repository, Aggregator(repository, rules, settings.consent_defaults(), DataClock()), events)
    finally:
        repository.close()
    models = RecommendRepository.open(settings)
    try:
        for version, seed in (("v1", 1), ("v2", 2)):
            models.save_model(booster(seed), ModelMeta(version, float(seed), F.RANKER_FEATURES, F.FEATURE_SERVICE))
        ModelRegistry(models.store).set_production(ModelKind.RANKER, "v1", 10.0)
    finally:
        models.close()


@pytest.fixture
def replicas(settings_factory: Callable[..., Any], tmp_path: Path) -> Iterator[Replicas]:
    settings: ProfileSettings = settings_factory(ProfileSettings)
    ProfileRepository.open(settings).close()  # the Feast registry exists before two processes open it
    (tmp_path / "experiments.yaml").write_text("experiments: []\n")  # seeds an empty stored configuration
    env = {
        **os.environ,
        "REDIS_URL": str(settings.redis_url),
        "SELARAS_NAMESPACE": settings.namespace,
        "SELARAS_FEAST_PROJECT": settings.feast_project,
        "SELARAS_DATA_DIR": str(settings.data_dir),
        "SELARAS_ENVIRONMENT": "test",
        "SELARAS_API_KEYS": "",
        "RECOMMEND_EXPERIMENTS_FILE": str(tmp_path / "experiments.yaml"),
        "RECOMMEND_REFRESH_INTERVAL_S": "0.5",
        "RECOMMEND_LOG_IMPRESSIONS": "false",
    }
    env.pop("SELARAS_METRICS_DIR", None)
    ports = [free_port(), free_port()]
    serve = [sys.executable, "-m", "services.cli", "serve", "recommend", "--port"]
    # The replicas start while the data is written (their imports take a while): they are ready once their
    # background refresh has read the catalog and the model registry.
    processes = [start_process([*serve, str(port)], env, tmp_path / f"r{i}.log") for i, port in enumerate(ports)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        history(settings)
        for url in urls:
            until(lambda u=url: ready(u), timeout=120)
        yield Replicas(urls, processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def traffic(replicas: Replicas, visitors: list[str], phase: str, stop: threading.Event, threads: int = 4) -> None:
    """Threads cycling through `visitors` on both replicas until `stop` (each visitor at least once)."""

    def worker(offset: int) -> None:
        with httpx.Client(timeout=30) as client:
            rounds = 0
            while rounds == 0 or not stop.is_set():
                for i in range(offset, len(visitors), threads):
                    replicas.ask(client, (i + rounds + offset) % 2, visitors[i], phase)
                rounds += 1

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    stop.wait()
    for thread in workers:
        thread.join(60)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:  # not listening yet
        return False


def until(check: Callable[[], bool], timeout: float = 6 * CONFIG_POLL_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the replicas did not follow the change in time"
        time.sleep(0.1)


@pytest.mark.slow
def test_weights_ramped_and_winner_promoted_while_traffic_flows(replicas: Replicas) -> None:
    pids = [process.pid for process in replicas.processes]
    arms = [{"name": arm, "weight": 0.5, "personalized": True, "model": model} for arm, model in MODELS.items()]
    created = replicas.admin(
        0,
        "POST",
        "/v1/experiments",
        {"key": KEY, "enabled": True, "slot_kinds": ["product"], "arms": arms, "coverage": 0.4},
    )
    assert created["status"] == "running"
    with httpx.Client(timeout=30) as client:

        def serves_both_models(replica: int) -> bool:
            # Both arms' versions are loaded off the request path: wait until each replica ranks by both.
            seen = {(a.arm, a.model) for a in (replicas.ask(client, replica, v, "warm-up") for v in FIRST[:40])}
            return {("control", "v1"), ("treatment", "v2")} <= seen

        for replica in (0, 1):
            until(lambda r=replica: serves_both_models(r), timeout=30)

    # Phase 1: traffic on both replicas; meanwhile the weights are ramped towards the challenger (50/50 at 40%
    # coverage -> 40/60 at 50%: every arm's bucket range grows in place, so nobody moves).
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(replicas, FIRST, "ramp", stop))
    sender.start()
    until(lambda: replicas.answered(FIRST, 0.0), timeout=60)
    ramped = replicas.admin(
        1, "PATCH", f"/v1/experiments/{KEY}", {"weights": {"control": 0.4, "treatment": 0.6}, "coverage": 0.5}
    )
    assert [a["weight"] for a in ramped["arms"]] == [0.4, 0.6] and ramped["bucket_version"] == 1
    until(lambda: replicas.admin(0, "GET", f"/v1/experiments/{KEY}")["coverage"] == 0.5)
    applied = time.perf_counter()
    until(lambda: replicas.answered(FIRST, applied), timeout=60)
    stop.set()
    sender.join(90)

    # Phase 2: new visitors arrive and the returning ones keep coming; the challenger is promoted meanwhile.
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(replicas, LATER + FIRST, "promote", stop))
    started = time.perf_counter()
    sender.start()
    until(lambda: replicas.answered(LATER + FIRST, started), timeout=60)
    promoting = time.perf_counter()
    promoted = replicas.admin(0, "POST", f"/v1/experiments/{KEY}/promote", {"arm": "treatment"})
    assert promoted["pinned_model"] == "v2" and promoted["status"] == "ended"
    with httpx.Client(timeout=30) as client:

        def everybody_gets_the_winner(replica: int) -> bool:
            answer = replicas.ask(client, replica, LATER[-1], "settling")
            return answer.arm is None and answer.model == "v2"

        until(lambda: everybody_gets_the_winner(0) and everybody_gets_the_winner(1), timeout=30)
    stop.set()
    sender.join(90)

    # Phase 3: after the promotion reached both replicas, every visitor gets the winner's model, outside any arm.
    stop = threading.Event()
    stop.set()  # one round over every visitor
    traffic(replicas, FIRST + LATER, "after", stop)

    answers = replicas.answers
    assert [a for a in answers if a.status != 200] == []
    assert all(p.poll() is None for p in replicas.processes) and [p.pid for p in replicas.processes] == pids
    exposed: dict[str, set[str]] = {}
    for answer in answers:
        if answer.arm is not None:
            exposed.setdefault(answer.visitor, set()).add(answer.arm)
        # Each arm is ranked by its own version (once loaded: until then the serving one stands in). Not checked
        # after the promotion: the pin makes the winner serve, and a replica a poll behind that still assigns
        # control loads v1 as an arm model only after the swap (it was the serving model), so for that moment
        # control is ranked by v2 (services/recommend/service.py reload_model).
        if answer.arm is not None and answer.phase != "warm-up" and answer.done < promoting:
            assert answer.model == MODELS[answer.arm], answer
    # Sticky: one arm per visitor, on both replicas, before and after the ramp.
    assert {v: arms for v, arms in exposed.items() if len(arms) > 1} == {}
    before_ramp = {a.visitor for a in answers if a.phase in ("warm-up", "ramp") and a.arm}
    after_ramp = {a.visitor for a in answers if a.phase == "promote" and a.arm}
    assert before_ramp & after_ramp and after_ramp - set(FIRST), "returning and new visitors in the ramped test"
    assert {(a.arm, a.model) for a in answers if a.phase == "after"} == {(None, "v2")}
    assert sum(a.phase == "after" for a in answers) == len(FIRST + LATER)
    # Exposures: exactly the distinct visitors that got an arm, across both replicas.
    report = replicas.admin(1, "GET", f"/v1/experiments/{KEY}/report")
    counted = {arm["name"]: arm["n"] for arm in report["arms"]}
    for arm in MODELS:
        assert counted[arm] == sum(arm in arms for arms in exposed.values()), (arm, counted)
    assert sum(counted.values()) == len(exposed) > 30
    print(f"live: {len(answers)} answers, {len(exposed)} exposed visitors, counted {counted}")  # visible with -s


@pytest.mark.parametrize(
    ("before", "after", "accepted"),
    [
        ((0.5, 0.5, 0.4), (0.4, 0.6, 0.5), True),  # the ramp of the live test
        ((0.5, 0.5, 0.4), (0.5, 0.5, 0.8), True),  # coverage only
        ((0.5, 0.5, 1.0), (0.4, 0.6, 1.0), False),  # full coverage: any new split moves someone
        ((0.5, 0.5, 0.4), (0.6, 0.4, 0.5), False),  # treatment's range would start later
        ((0.5, 0.5, 0.4), (0.3, 0.7, 0.5), False),  # control's range would shrink
    ],
)
def test_a_weight_change_is_accepted_exactly_when_nobody_assigned_moves(
    before: tuple[float, float, float], after: tuple[float, float, float], accepted: bool
) -> None:
    arms = [{"name": name, "weight": w, "personalized": True} for name, w in zip(MODELS, before[:2], strict=True)]
    current = ExperimentConfig.model_validate(
        {"key": KEY, "slot_kinds": ["product"], "arms": arms, "coverage": before[2]}
    )
    weights = dict(zip(MODELS, after[:2], strict=True))
    assert keeps_assigned(current, weights, after[2]) is accepted
    moved = 0
    for n in range(5000):
        old = assign(KEY, f"v{n}", list(MODELS), before[:2], before[2])
        new = assign(KEY, f"v{n}", list(MODELS), after[:2], after[2])
        moved += old is not None and (new is None or new.arm != old.arm)
    # Over 5,000 visitors a refused change moves many of them (its ranges differ by at least 5% of the space).
    assert (moved == 0) is accepted and (accepted or moved > 100), moved
