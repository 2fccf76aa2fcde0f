"""Candidate indexes kept by the profile service and read by the recommend service (pure, no I/O).

- Co-visitation: what a visitor interacted with next ("after this, people went to ..."). Order-aware: the
  item interacted with d steps after another (d <= 3) adds 1/d to the pair in that direction and a weaker
  share in the reverse direction. Views, carts, purchases and clicks all count: a shop that only exports
  orders must still teach it something.
- Context popularity: decayed interaction scores per context (city, part of day, device), for
  "trending in Jakarta this evening".

`observe_interaction` is the one update rule: the profile aggregator, training replays and the bulk history
builder (services/recommend/bulk_history.py, proven equal by a parity test) all go through it or match it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter

import orjson

from services.common.context import daypart, local_hour, zone_for

COVISIT_WINDOW = 3  # the previous N items of the visitor count as co-visited
# "b after a" predicts the next item; "a after b" says the two belong together, more weakly.
COVISIT_REVERSE_WEIGHT = 0.5
COVISIT_MAX_NEIGHBOURS = 60
RECENT_ITEMS = 20
# Popularity weight of each interaction type (co-visitation counts every interaction alike: order matters).
INTERACTION_WEIGHTS = {"product_view": 1.0, "add_to_cart": 3.0, "purchase": 5.0, "click": 1.5}
POPULARITY_HALF_LIFE_S = 3 * 24 * 3600.0
POPULARITY_MAX_ITEMS = 300
GLOBAL_CONTEXT = "all"


class CoVisitation:
    def __init__(self) -> None:
        self.neighbours: dict[str, dict[str, float]] = {}
        self.dirty: set[str] = set()

    def observe(self, previous_items: Iterable[str], item_id: str, weight: float = 1.0) -> None:
        """`previous_items` most recent first: the one just before `item_id` is at distance 1."""
        for rank, other in enumerate(previous_items):
            if rank >= COVISIT_WINDOW:
                break
            if other == item_id:
                continue
            w = weight / (rank + 1)
            self._add(other, item_id, w)
            self._add(item_id, other, w * COVISIT_REVERSE_WEIGHT)

    def _add(self, item_id: str, other: str, weight: float) -> None:
        row = self.neighbours.setdefault(item_id, {})
        row[other] = row.get(other, 0.0) + weight
        if len(row) > 2 * COVISIT_MAX_NEIGHBOURS:
            kept = sorted(row.items(), key=lambda kv: -kv[1])[:COVISIT_MAX_NEIGHBOURS]
            self.neighbours[item_id] = dict(kept)
        self.dirty.add(item_id)

    def top(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The k heaviest neighbours, ties by id. Two C-level sorts (by id, then stably by weight, descending)
        instead of one with a Python key tuple per entry: this runs for every touched row of every fold batch."""
        ranked = sorted(self.neighbours.get(item_id, {}).items(), key=itemgetter(0))
        ranked.sort(key=itemgetter(1), reverse=True)  # stable: equal weights keep the id order
        return ranked[:k]

    def load(self, item_id: str, blob: bytes) -> None:
        self.neighbours[item_id] = dict(orjson.loads(blob))

    def dump(self, item_id: str) -> bytes:
        return orjson.dumps(self.top(item_id, COVISIT_MAX_NEIGHBOURS))

    @staticmethod
    def merge(stored: bytes | None, delta: Mapping[str, float]) -> bytes:
        """A stored row plus the weights one batch added (folded into an empty index): weights add up."""
        row = dict(orjson.loads(stored)) if stored else {}
        for other, weight in delta.items():
            row[other] = row.get(other, 0.0) + weight
        merged = CoVisitation()
        merged.neighbours["row"] = row
        return merged.dump("row")


def push_recent(items: list[str], item_id: str, cap: int = RECENT_ITEMS) -> None:
    """A visitor's recent items, most recent first, each once (the visitor row's `recent_items`)."""
    if item_id in items:
        items.remove(item_id)
    items.insert(0, item_id)
    del items[cap:]


def observe_interaction(
    covisitation: CoVisitation,
    popularity: ContextPopularity,
    event_type: str,
    item_id: str | None,
    previous_items: Sequence[str],
    keys: Iterable[str],
    ts: float,
) -> bool:
    """The index update of one interaction (`previous_items`: the visitor's recent items before it, most
    recent first). Returns False for events that are not interactions with an item."""
    weight = INTERACTION_WEIGHTS.get(event_type)
    if weight is None or not item_id:
        return False
    popularity.observe(keys, item_id, weight, ts)
    covisitation.observe(previous_items, item_id)
    return True


def context_keys(ts: float, city: str | None, device: str | None, utc_offset_min: int | None) -> list[str]:
    part = daypart(local_hour(ts, zone_for(city, utc_offset_min)))
    keys = [GLOBAL_CONTEXT, f"daypart:{part}"]
    if city:
        keys += [f"city:{city.lower()}", f"city:{city.lower()}|daypart:{part}"]
    if device:
        keys.append(f"device:{device}")
    return keys


class ContextPopularity:
    """Per context key: item -> [decayed score, last update ts]."""

    def __init__(self) -> None:
        self.scores: dict[str, dict[str, list[float]]] = {}
        self.dirty: set[str] = set()

    def observe(self, keys: Iterable[str], item_id: str, weight: float, ts: float) -> None:
        for key in keys:
            row = self.scores.setdefault(key, {})
            entry = row.get(item_id)
            if entry is None:
                row[item_id] = [weight, ts]
            else:
                # No time passed (or the event is older): the decay factor is 1; skipping pow changes no bit.
                score = (
                    entry[0] if ts <= entry[1] else entry[0] * math.pow(0.5, (ts - entry[1]) / POPULARITY_HALF_LIFE_S)
                )
                row[item_id] = [score + weight, ts]
            if len(row) > 2 * POPULARITY_MAX_ITEMS:
                self.scores[key] = dict(self._ranked(row, ts)[:POPULARITY_MAX_ITEMS])
            self.dirty.add(key)

    @staticmethod
    def _ranked(row: dict[str, list[float]], now: float) -> list[tuple[str, list[float]]]:
        # Ordered by the score decayed to the row's newest entry (or `now`, if earlier): the order is the
        # same as at any later time, and a history far older than `now` does not underflow to all zeros.
        reference = min(now, max((entry[1] for entry in row.values()), default=now))

        def decayed(entry: list[float]) -> float:
            return entry[0] * math.pow(0.5, max(reference - entry[1], 0.0) / POPULARITY_HALF_LIFE_S)

        return sorted(row.items(), key=lambda kv: -decayed(kv[1]))

    def top(self, key: str, now: float, k: int) -> list[tuple[str, float]]:
        row = self.scores.get(key, {})
        ranked = self._ranked(row, now)[:k]
        return [
            (item, entry[0] * math.pow(0.5, max(now - entry[1], 0.0) / POPULARITY_HALF_LIFE_S))
            for item, entry in ranked
        ]

    def load(self, key: str, blob: bytes) -> None:
        self.scores[key] = {item: list(entry) for item, entry in orjson.loads(blob).items()}

    @staticmethod
    def merge(stored: bytes | None, delta: Mapping[str, Sequence[float]]) -> bytes:
        """A stored row plus one batch's scores (folded into an empty index): both decayed to the later of
        their times and added, which equals folding the batch's interactions into the stored row."""
        merged = ContextPopularity()
        if stored:
            merged.load("row", stored)
        row = merged.scores.setdefault("row", {})
        for item, (score, ts) in delta.items():
            if item in row:
                old_score, old_ts = row[item]
                newest = max(old_ts, ts)
                score = old_score * math.pow(0.5, (newest - old_ts) / POPULARITY_HALF_LIFE_S) + score * math.pow(
                    0.5, (newest - ts) / POPULARITY_HALF_LIFE_S
                )
                ts = newest
            row[item] = [score, ts]
        return merged.dump("row")

    def dump(self, key: str) -> bytes:
        row = self.scores.get(key, {})
        newest = max((entry[1] for entry in row.values()), default=0.0)
        return orjson.dumps(dict(self._ranked(row, newest)[:POPULARITY_MAX_ITEMS]))
