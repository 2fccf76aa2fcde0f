"""What one answered slot becomes: the item cards of the answer and the impression events of the log.

Built for every shown item on the hot path, so plain dicts rather than validated models (`ItemCard` in
schemas.py and the event schema describe them); the repository's writer thread serialises the impressions.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from services.experiments.config import ArmChoice
from services.features.item_cache import ItemSnapshot
from services.recommend.schemas import RecommendRequest, SlotRequest


def item_card(snapshot: ItemSnapshot, i: int, position: int, score: float) -> dict[str, Any]:
    """An answer's item (`ItemCard` in schemas.py) as a plain dict: built for every shown item."""
    return {
        "item_id": snapshot.ids[i],
        "position": position,
        "score": round(score, 6),
        "title": snapshot.titles[i],
        "category": snapshot.categories[i],
        "brand": snapshot.brands[i],
        "price": None if math.isnan(snapshot.price[i]) else float(snapshot.price[i]),
        "url": snapshot.urls[i],
        "image_url": snapshot.image_urls[i],
    }


def impression_event(
    request: RecommendRequest,
    recommendation_id: str,
    slot: SlotRequest,
    item_id: str,
    position: int,
    score: float,
    propensity: float,
    now: float,
    experiment: ArmChoice | None,
    rank: int | None = None,
    pool: int | None = None,
    shared: tuple[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The impression event as its JSON dict (the log's schema): built for every shown item, so plain dicts
    rather than validated models; the writer thread serialises them. `shared`: `impression_shared(request,
    now)`, the same for every item of an answer (computed here when not given)."""
    timestamp, context = shared if shared is not None else impression_shared(request, now)
    properties: dict[str, Any] = {
        "slot": slot.name,
        "slot_kind": slot.kind.value,
        "position": position,
        "score": round(score, 6),
        "propensity": propensity,
    }
    if slot.strategy != "personal":  # training and reports can tell item-to-item and reranked lists apart
        properties["strategy"] = slot.strategy
    if rank is not None and pool is not None:
        # Off-policy evaluation of other rankings of the same pool needs both (services/offline/policy.py).
        properties["rank"], properties["pool"] = rank, pool
    if experiment:
        properties["experiment"], properties["arm"] = experiment[0], experiment[1]
    return {
        "event_id": f"imp:{recommendation_id}:{slot.name}:{position}",
        "visitor_id": request.visitor_id,
        "type": "impression",
        "timestamp": timestamp,
        "item_id": item_id,
        "recommendation_id": recommendation_id,
        "context": dict(context),  # its own copy: events are handed to the writer thread one by one
        "properties": properties,
    }


def impression_shared(request: RecommendRequest, now: float) -> tuple[str, dict[str, Any]]:
    """The parts of an impression that every item of an answer shares: its timestamp and its `context`."""
    ctx = request.context
    context = {
        name: value
        for name, value in (
            ("device", ctx.device.value if ctx.device else None),
            ("channel", ctx.channel),
            ("city", ctx.city),
            ("locale", ctx.locale),
        )
        if value is not None
    }
    return datetime.fromtimestamp(now, tz=UTC).isoformat(), context
