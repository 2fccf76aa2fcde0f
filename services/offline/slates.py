"""Logged slates: the recommend service's impressions and the clicks that answer them, read from the event log.

The recommend service logs one impression event per placed item with `properties.position` and
`properties.propensity` (the probability of placing that item at that position given the items placed
before it, services/recommend/ranking/exploration.py), and, when it explores, `rank` (the item's place in the
deterministic ranked list) and `pool` (how many eligible items it chose from). Impressions of one
(recommendation_id, slot) form a slate; a click that echoes the recommendation id and names a shown item
(within the attribution window) is the reward of that item's position.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from services.common.events import Event, EventType


@dataclass
class LoggedSlate:
    recommendation_id: str
    slot: str
    visitor_id: str
    ts: float
    items: list[str]
    propensities: np.ndarray
    ranks: list[int] | None  # None when the service did not log them (exploration off)
    pool: int | None
    rewards: np.ndarray  # 1 where the item at that position was clicked

    @property
    def deterministic(self) -> bool:
        return bool(np.all(self.propensities >= 1.0))

    @property
    def fixed(self) -> int:
        """Leading positions held by merchandiser pins: placed with probability 1 although the pool still
        offered a choice. Every target keeps them (the service places pins first whatever it ranks)."""
        if self.pool is None:
            return 0
        count = 0
        while count < len(self.items) and self.propensities[count] >= 1.0 and self.pool - count > 1:
            count += 1
        return count


@dataclass
class SlateLog:
    slates: list[LoggedSlate] = field(default_factory=list)
    impressions: int = 0
    clicks: int = 0
    clicks_attributed: int = 0
    malformed: int = 0  # slates with missing positions or propensities


@dataclass(frozen=True)
class _Shown:
    """What a slate needs of one impression (kept instead of the event: logs can be large)."""

    item_id: str
    visitor_id: str
    ts: float
    propensity: Any
    rank: Any
    pool: Any


def load_slates(events: Iterable[Event], attribution_window_s: float = 24 * 3600.0) -> SlateLog:
    """Group impressions into slates and attach the clicks that echo their recommendation id."""
    groups: dict[tuple[str, str], dict[int, _Shown]] = {}
    clicks: dict[str, list[tuple[str, Any, float]]] = {}
    log = SlateLog()
    for event in events:
        if event.type is EventType.IMPRESSION and event.recommendation_id and event.item_id:
            log.impressions += 1
            properties = event.properties
            position = properties.get("position")
            key = (event.recommendation_id, str(properties.get("slot", "")))
            shown = _Shown(
                event.item_id,
                event.visitor_id,
                event.ts,
                properties.get("propensity"),
                properties.get("rank"),
                properties.get("pool"),
            )
            if not isinstance(position, int) or isinstance(position, bool):
                position = -1  # marks the slate malformed
            groups.setdefault(key, {})[position] = shown
        elif event.type is EventType.CLICK and event.recommendation_id and event.item_id:
            log.clicks += 1
            clicks.setdefault(event.recommendation_id, []).append(
                (event.item_id, event.properties.get("slot"), event.ts)
            )
    slates: list[LoggedSlate] = []
    for (recommendation_id, slot), by_position in groups.items():
        positions = sorted(by_position)
        if positions != list(range(len(positions))):
            log.malformed += 1
            continue
        shown_items = [by_position[p] for p in positions]
        propensities = [e.propensity for e in shown_items]
        if not all(isinstance(p, int | float) and not isinstance(p, bool) and 0 < p <= 1 for p in propensities):
            log.malformed += 1
            continue
        raw_ranks = [e.rank for e in shown_items]
        ranks = [int(r) for r in raw_ranks] if all(isinstance(r, int) for r in raw_ranks) else None
        pool_value = shown_items[0].pool
        items = [e.item_id for e in shown_items]
        rewards = np.zeros(len(items))
        ts = shown_items[0].ts
        for item_id, click_slot, click_ts in clicks.get(recommendation_id, []):
            if click_slot is not None and str(click_slot) != slot:
                continue
            if not 0 <= click_ts - ts <= attribution_window_s or item_id not in items:
                continue
            position = items.index(item_id)
            if rewards[position] == 0:
                log.clicks_attributed += 1
            rewards[position] = 1.0
        slates.append(
            LoggedSlate(
                recommendation_id,
                slot,
                shown_items[0].visitor_id,
                ts,
                items,
                np.asarray(propensities, dtype=np.float64),
                ranks,
                int(pool_value) if isinstance(pool_value, int) else None,
                rewards,
            )
        )
    slates.sort(key=lambda s: s.ts)
    log.slates = slates
    return log


@dataclass
class FileEvents:
    """Events of a JSON Lines file (optionally gzipped), re-readable; invalid lines are counted and skipped."""

    path: Path
    invalid_lines: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[Event]:
        self.invalid_lines = []
        opener = gzip.open if self.path.suffix == ".gz" else open
        with opener(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield Event.model_validate(orjson.loads(line))
                except (orjson.JSONDecodeError, ValidationError):
                    self.invalid_lines.append(number)
