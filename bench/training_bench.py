"""Training time on N logged impressions (issue #7: 1,000,000 in ≤ 120 s).

A demo world supplies visitors with point-in-time features; impressions are then logged as the service
would log them (groups of 15 per recommendation, with position and propensity), clicks drawn from the
simulator's true click probability. The timed part is `Trainer.train()` on the impression source.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from services.common.events import Event, EventContext, EventType, envelope
from services.common.settings import CommonSettings
from services.common.storage import PendingEvent, open_store
from services.demo.world import build_world
from services.recommend.repository import RecommendRepository
from services.recommend.training.train import TrainConfig, Trainer

GROUP = 15


def train_on_impressions(redis_url: str, data_dir: Path, impressions: int = 1_000_000) -> dict[str, Any]:
    namespace = "seltrain"
    from bench.run import clean_namespace

    clean_namespace(namespace)
    settings = CommonSettings(data_dir=data_dir, redis_url=redis_url, namespace=namespace, feast_project=namespace)
    world = build_world(settings, visitors=500, days=14, seed=5, train=False)
    simulator, shop = world.simulator, world.shop
    products = [p.item_id for p in shop.products if p.in_stock]
    rng = np.random.default_rng(5)
    start, end = world.start.timestamp(), world.end.timestamp()
    store = open_store(settings)
    visitors = [v.visitor_id for v in simulator.visitors]
    groups = impressions // GROUP
    logged_started = time.perf_counter()
    batch: list[PendingEvent] = []
    for g in range(groups):
        visitor = str(rng.choice(visitors))
        ts = float(rng.uniform(start + 0.2 * (end - start), end))
        moment = datetime.fromtimestamp(ts, tz=UTC)
        rec = f"b{g}"
        shown = rng.choice(products, GROUP, replace=False)
        for position, item in enumerate(shown):
            event = Event(
                event_id=f"imp:{rec}:{position}",
                visitor_id=visitor,
                type=EventType.IMPRESSION,
                timestamp=moment,
                item_id=str(item),
                recommendation_id=rec,
                context=EventContext(device="mobile", city="Jakarta"),
                properties={"slot": "home", "position": position, "propensity": 1.0},
            )
            batch.append(PendingEvent(event.event_id, visitor, envelope(event, ts)))
            if rng.random() < simulator.click_probability(visitor, str(item), position, moment):
                click = Event(
                    event_id=f"clk:{rec}:{position}",
                    visitor_id=visitor,
                    type=EventType.CLICK,
                    timestamp=moment,
                    item_id=str(item),
                    recommendation_id=rec,
                    properties={"slot": "home"},
                )
                batch.append(PendingEvent(click.event_id, visitor, envelope(click, ts)))
        if len(batch) >= 20_000:
            store.append_events(batch)
            batch = []
    if batch:
        store.append_events(batch)
    store.close()
    logged_seconds = time.perf_counter() - logged_started

    repository = RecommendRepository.open(settings)
    started = time.perf_counter()
    result = Trainer(repository, TrainConfig(source="impressions", max_queries=groups, seed=5)).train()
    seconds = time.perf_counter() - started
    repository.close()
    return {
        "impressions": groups * GROUP,
        "groups": groups,
        "seconds": round(seconds, 1),
        "logging_seconds": round(logged_seconds, 1),
        "metrics": result.metrics,
        "detail": f"{result.metrics.get('train_rows', 0):,} training rows",
    }
