"""Extra consumers of the aggregator's micro-batches (e.g. experiment attribution).

The aggregator calls every observer once per folded batch, after features are written and before the log
cursor moves, so an observer failure makes the batch retry (observers must therefore be idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.common.events import Event
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings


class BatchObserver(Protocol):
    def observe(self, batch: Sequence[tuple[str, Event]]) -> None:
        """`batch` holds (log position, event) pairs in log order."""


def build_batch_observers(settings: ProfileSettings, repository: ProfileRepository) -> list[BatchObserver]:
    return []
