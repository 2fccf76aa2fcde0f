"""Extra consumers of the aggregator's micro-batches (today: experiment attribution).

The aggregator calls every observer once per folded batch, after features are written and before the log
cursor moves, so an observer failure makes the batch retry (observers must therefore be idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.common.consent import Consent
from services.common.events import Event
from services.experiments.attribution import ExperimentAttribution
from services.experiments.store import open_experiment_store
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings


class BatchObserver(Protocol):
    def observe(self, batch: Sequence[tuple[str, Event]]) -> None:
        """`batch` holds (log position, event) pairs in log order."""


def build_batch_observers(settings: ProfileSettings, repository: ProfileRepository) -> list[BatchObserver]:
    defaults = settings.consent_defaults()

    def refusing_analytics(visitor_ids: Sequence[str]) -> set[str]:
        consents = repository.consents(visitor_ids)
        return {v for v in visitor_ids if not consents.get(v, Consent()).allows("analytics", defaults)}

    return [ExperimentAttribution(open_experiment_store(settings), refusing_analytics)]
