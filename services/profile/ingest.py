"""Ingestion: validated events appended to the durable log (idempotent on event_id). Acknowledged means stored:
a failure raises StorageUnavailable and nothing is acknowledged. The aggregator folds the log (aggregator.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter

from services.common.clock import SYSTEM_CLOCK, Clock, wall_time
from services.common.errors import StorageUnavailable
from services.common.events import Event, EventType, envelope, future_timestamp_error
from services.common.storage import AppendResult, PendingEvent
from services.common.traits import TraitSchema
from services.profile.repository import ProfileRepository

EVENTS_INGESTED = Counter("selaras_events_ingested_total", "Events acknowledged into the durable log", ["type"])
EVENTS_DUPLICATE = Counter("selaras_events_duplicate_total", "Re-sent events recognised by event_id")
EVENTS_REFUSED = Counter("selaras_events_refused_total", "Events refused, by reason", ["reason"])


class IngestService:
    def __init__(
        self,
        repository: ProfileRepository,
        clock: Clock = SYSTEM_CLOCK,
        max_skew_s: float = 300.0,
        traits: TraitSchema | None = None,
    ):
        self.repository = repository
        self.clock = clock
        self.max_skew_s = max_skew_s
        self.traits = traits or TraitSchema()

    def trait_errors(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        """`profile_update` properties the declared trait schema refuses, as errors by index and field (so a
        stored trait is always of its declared type)."""
        errors = [
            {"index": index, "field": f"properties.{name}", "message": message}
            for index, event in enumerate(events)
            if event.type is EventType.PROFILE_UPDATE
            for name, message in self.traits.errors(event.properties)
        ]
        if errors:
            EVENTS_REFUSED.labels("invalid_trait").inc(len({e["index"] for e in errors}))
        return errors

    def future_errors(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        """Events dated further ahead of the clock than the allowed skew, as errors by index and field."""
        now = self.clock.now()
        errors = []
        for index, event in enumerate(events):
            message = future_timestamp_error(event, now, self.max_skew_s)
            if message is not None:
                errors.append({"index": index, "field": "timestamp", "message": message})
        if errors:
            EVENTS_REFUSED.labels("future_timestamp").inc(len(errors))
        return errors

    def ingest(self, events: Sequence[Event]) -> AppendResult:
        """Append validated events to the durable log. Raises StorageUnavailable: nothing is acknowledged."""
        now = wall_time()  # when the log received it (the freshness metric), not business time
        pending = [PendingEvent(e.event_id, e.visitor_id, envelope(e, now)) for e in events]
        # An event id repeated inside one batch counts as a duplicate, like a re-sent one.
        try:
            result = self.repository.append(pending)
        except StorageUnavailable:
            EVENTS_REFUSED.labels("storage_unavailable").inc(len(events))
            raise
        accepted = set(result.accepted_ids)
        by_type: dict[str, int] = {}
        for event in events:
            if event.event_id in accepted:
                by_type[event.type.value] = by_type.get(event.type.value, 0) + 1
                accepted.discard(event.event_id)
        for kind, count in by_type.items():
            EVENTS_INGESTED.labels(kind).inc(count)
        if result.duplicates:
            EVENTS_DUPLICATE.inc(result.duplicates)
        return result
