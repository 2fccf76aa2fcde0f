"""A complete demo world in one call: the shop, its simulated history ingested and folded, a trained model.

Used by `selaras demo`, the tests and the benchmarks, so all three build the world the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from services.common.clock import SYSTEM_CLOCK, DataClock
from services.common.context import WIB
from services.common.events import Event
from services.common.settings import CommonSettings
from services.demo.shop import DemoShop, generate_shop
from services.demo.simulator import Simulator
from services.features.aggregations import SegmentRules
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.persona_jobs import run_persona_job
from services.profile.personas.repository import PersonaRepository
from services.profile.repository import ProfileRepository
from services.recommend.repository import RecommendRepository
from services.recommend.training.train import TrainConfig, Trainer

Progress = Callable[[str, float], None]


@dataclass
class World:
    shop: DemoShop
    simulator: Simulator
    start: datetime
    end: datetime
    events: int = 0
    train_metrics: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    personas: dict[str, Any] = field(default_factory=dict)  # the persona job's report


def _noop(_: str, __: float) -> None:
    return None


def batched(events: Iterable[Event], size: int) -> Iterator[list[Event]]:
    batch: list[Event] = []
    for event in events:
        batch.append(event)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest_events(
    repository: ProfileRepository,
    aggregator: Aggregator,
    events: Iterable[Event],
    batch_size: int = 5000,
    on_batch: Callable[[Event], None] | None = None,
) -> int:
    """Append in batches through the ingest path and fold each batch before the next (bounded memory)."""
    ingest = IngestService(repository)
    total = 0
    for batch in batched(events, batch_size):
        ingest.ingest(batch)
        while aggregator.run_once(2 * batch_size).events:
            pass
        total += len(batch)
        if on_batch:
            on_batch(batch[-1])
    return total


def build_world(
    settings: CommonSettings,
    visitors: int = 1000,
    days: int = 30,
    seed: int = 7,
    end: datetime | None = None,
    train: bool = True,
    train_config: TrainConfig | None = None,
    progress: Progress | None = None,
    n_products: int = 2000,
) -> World:
    progress = progress or _noop
    end = end or SYSTEM_CLOCK.now_datetime().astimezone(WIB).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(days=days)
    timings: dict[str, float] = {}

    began = time.perf_counter()
    shop = generate_shop(seed=seed, n_products=n_products, now=end)
    simulator = Simulator(shop, n_visitors=visitors, seed=seed, start=start)
    profile_repository = ProfileRepository.open(settings)
    try:
        profile_repository.upsert_catalog(shop.all_items())
        # The fold follows the simulated history's own time, like an import (`DataClock`).
        rules = SegmentRules.from_settings(settings)
        aggregator = Aggregator(profile_repository, rules, settings.consent_defaults(), clock=DataClock())
        span = max((end - start).total_seconds(), 1.0)
        count = ingest_events(
            profile_repository,
            aggregator,
            simulator.history(days),
            on_batch=lambda last: progress("importing the shop's history", (last.ts - start.timestamp()) / span),
        )
        aggregator.age_item_rows(force=True)  # item windows as of the history's end
        progress("importing the shop's history", 1.0)
        timings["import"] = time.perf_counter() - began
        # Personas before training, so the ranker learns from (and is served) persona ids.
        began = time.perf_counter()
        progress("learning personas", 0.0)
        try:
            personas = run_persona_job(
                PersonaRepository(profile_repository.store, profile_repository.feature_store, settings.offline_dir),
                rules,
                seed=seed,
                now=end.timestamp(),
            ).report()
        except ValueError as exc:  # a tiny world has too few active visitors for personas
            personas = {"skipped": str(exc)}
        progress("learning personas", 1.0)
        timings["personas"] = time.perf_counter() - began
    finally:
        profile_repository.close()
    world = World(shop, simulator, start, end, events=count, seconds=timings, personas=personas)
    if train:
        began = time.perf_counter()
        recommend_repository = RecommendRepository.open(settings)
        try:
            result = Trainer(recommend_repository, train_config or TrainConfig(seed=seed), progress).train()
            result.publish(recommend_repository)
        finally:
            recommend_repository.close()
        world.train_metrics = result.metrics
        world.model_version = result.meta.version
        timings["train"] = time.perf_counter() - began
    return world
