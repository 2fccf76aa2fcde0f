"""The candidate indexes replayed from the logged events in time order: training's point-in-time view of what
the aggregator had folded before each query."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from services.features.indexes import ContextPopularity, CoVisitation, context_keys, observe_interaction, push_recent
from services.recommend.training.event_columns import LoggedEvent


class LiveNeighbours(Mapping[str, list[tuple[str, float]]]):
    """A read-through view of the replayed co-visitation index."""

    def __init__(self, covisitation: CoVisitation):
        self.covisitation = covisitation

    def __getitem__(self, item_id: str) -> list[tuple[str, float]]:
        if item_id not in self.covisitation.neighbours:
            raise KeyError(item_id)
        return self.covisitation.top(item_id, 60)

    def __iter__(self) -> Iterator[str]:
        return iter(self.covisitation.neighbours)

    def __len__(self) -> int:
        return len(self.covisitation.neighbours)


@dataclass
class Replay:
    """The candidate indexes replayed from the log in time order, with each visitor's recent items and last
    known place, updated by the aggregator's own rule (`observe_interaction`)."""

    covisitation: CoVisitation = field(default_factory=CoVisitation)
    popularity: ContextPopularity = field(default_factory=ContextPopularity)
    recent: dict[str, list[str]] = field(default_factory=dict)
    places: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def observe(self, event: LoggedEvent) -> None:
        # The visitor's city and UTC offset as the aggregator's visitor state keeps them: the last known.
        city, offset = self.places.get(event.visitor_id, ("", None))
        city = event.city or city
        offset = event.utc_offset_min if event.utc_offset_min is not None else offset
        self.places[event.visitor_id] = (city, offset)
        previous = self.recent.setdefault(event.visitor_id, [])
        keys = context_keys(event.ts, city, event.device, offset)
        if observe_interaction(
            self.covisitation, self.popularity, event.type.value, event.item_id, previous, keys, event.ts
        ):
            push_recent(previous, event.item_id or "")
