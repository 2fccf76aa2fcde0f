"""Item embeddings for the event-log trainer (`selaras train`), point in time: each training query sees
embeddings learned only from the interactions before it; the saved model gets them learned on everything."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import Protocol

from services.common.events import EventType
from services.recommend.ranking.item_embeddings import ItemEmbeddings

# The event types of train.GRADES (views, clicks, carts, purchases): what the ranker learns from too.
INTERACTIONS = frozenset({EventType.PRODUCT_VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE})

EMBEDDING_REFITS = 4  # point-in-time item embeddings are refitted this many times over the log


class Interaction(Protocol):
    """What the sequences read of an event: a logged `Event`, or training's `LoggedEvent` row."""

    @property
    def visitor_id(self) -> str: ...

    @property
    def ts(self) -> float: ...

    @property
    def type(self) -> EventType: ...

    @property
    def item_id(self) -> str | None: ...


class EmbeddingsOverTime:
    """Item embeddings as of a moment: fitted on the interactions before each of a few refit times, so a
    training query only sees embeddings learned from its past (a query before the first refit sees none, as a
    shop without a trained model serves none). Sequences: each visitor's product interactions in time order."""

    def __init__(self, events: Sequence[Interaction], products: set[str], refit_times: Sequence[float]):
        self.times = sorted(refit_times)
        self.fitted: list[ItemEmbeddings | None] = [
            ItemEmbeddings.fit(interaction_sequences(events, products, before=at)) for at in self.times
        ]

    def at(self, ts: float) -> ItemEmbeddings | None:
        position = bisect.bisect_left(self.times, ts) - 1  # strictly before the query
        return self.fitted[position] if position >= 0 else None


def interaction_sequences(
    events: Iterable[Interaction], products: set[str], before: float = math.inf
) -> list[list[str]]:
    """Each visitor's viewed, carted and bought products in time order (`events` sorted), before `before`."""
    sequences: dict[str, list[str]] = {}
    for event in events:
        if event.ts >= before:
            break
        if event.type in INTERACTIONS and event.item_id in products:
            sequences.setdefault(event.visitor_id, []).append(event.item_id)
    return list(sequences.values())
