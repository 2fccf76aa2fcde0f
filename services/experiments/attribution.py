"""Experiment attribution: outcome events (clicks, carts, purchases, message opens) go to the arm that served
the visitor. The profile service runs it as an observer of the aggregator's micro-batches
(services/profile/aggregator/observers.py), so it must be idempotent: the store applies each event at most once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from prometheus_client import Counter

from services.common.events import OUTCOME_EVENT_TYPES, Event, EventType
from services.experiments.store.base import ExperimentStore, OutcomeWrite
from services.experiments.store.sums import count_increments

log = logging.getLogger(__name__)

# Outcomes may carry a timestamp slightly before the exposure they answer (client clocks).
CLOCK_SKEW_S: Final = 300.0
WINDOW_TYPES: Final = frozenset({EventType.ADD_TO_CART, EventType.PURCHASE})
OUTCOMES = Counter(
    "selaras_experiment_outcomes",
    "Outcome events considered for experiment attribution, by result",
    ["experiment", "result"],
)


def outcome_values(event: Event, exposure_kind: str) -> dict[str, float]:
    """The metric increments an outcome event brings (binary metrics ignore the amount)."""
    if event.type is EventType.PURCHASE:
        return {"conversion": 1.0, "revenue": (event.price or 0.0) * (event.quantity or 1)}
    if event.type is EventType.ADD_TO_CART:
        return {"add_to_cart": 1.0}
    if exposure_kind == "message":
        if event.type is EventType.MESSAGE_OPEN:
            return {"open_rate": 1.0}
        if event.type is EventType.MESSAGE_CLICK:
            return {"ctr": 1.0}
    elif event.type is EventType.CLICK:
        return {"ctr": 1.0}
    return {}


def slot_group(event: Event, record: Mapping[str, Any], entry: Mapping[str, Any]) -> str | None:
    """The slot (or channel) the outcome came from: the slot that showed the item, else the event's own
    `properties.slot` mapped to a configured slot label."""
    slots: Mapping[str, Sequence[str]] = record.get("slots", {})
    if record.get("kind") == "message":
        return f"slot:{next(iter(slots))}" if slots else None
    for label, items in slots.items():
        if event.item_id is not None and event.item_id in items:
            return f"slot:{label}"
    named = event.properties.get("slot")
    if isinstance(named, str):
        return f"slot:{named if named in entry.get('slots', []) else 'other'}"
    return None


class ExperimentAttribution:
    """Attributes outcome events to the experiment arm that served the visitor.

    An outcome that echoes the `recommendation_id` of an experiment exposure goes to that exposure's arm and
    slot, if it happens within the attribution window after it. An add-to-cart or purchase without one goes
    to every experiment that exposed the visitor within the window before it. The store applies each event
    at most once per experiment, which makes re-delivered batches harmless."""

    def __init__(self, store: ExperimentStore, refusing_analytics: Callable[[Sequence[str]], set[str]] | None = None):
        self.store = store
        # Visitors (of those given) whose consent refuses `analytics`: their outcomes are not tracked.
        self.refusing_analytics = refusing_analytics

    def observe(self, batch: Sequence[tuple[str, Event]]) -> None:
        outcomes = [event for _, event in batch if event.type in OUTCOME_EVENT_TYPES]
        if outcomes and self.refusing_analytics is not None:
            refused = self.refusing_analytics(sorted({e.visitor_id for e in outcomes}))
            outcomes = [e for e in outcomes if e.visitor_id not in refused]
        if not outcomes:
            return
        registry = self.store.registry()
        if not registry:
            return
        entries = {entry["id"]: entry for entry in registry.values()}
        ids = list(entries)
        rec_ids = [e.recommendation_id for e in outcomes if e.recommendation_id]
        records = self.store.exposure_records(ids, rec_ids) if rec_ids else {}
        unresolved = [
            e
            for e in outcomes
            if e.type in WINDOW_TYPES and not (e.recommendation_id and e.recommendation_id in records)
        ]
        heads = self.store.visitor_heads(ids, [e.visitor_id for e in unresolved]) if unresolved else {}

        writes: list[OutcomeWrite] = []
        for event in outcomes:
            resolved = records.get(event.recommendation_id) if event.recommendation_id else None
            if resolved is not None:
                experiment_id, record = resolved
                entry = entries[experiment_id]
                if record.get("visitor_id") != event.visitor_id:
                    OUTCOMES.labels(entry["key"], "other_visitor").inc()
                    continue
                values = outcome_values(event, str(record.get("kind", "recommend")))
                if not values:
                    continue
                exposed_at = float(record["ts"])
                writes.append(
                    OutcomeWrite(
                        experiment_id,
                        event.visitor_id,
                        event.event_id,
                        event.ts,
                        values,
                        slot_group(event, record, entry),
                        expected_arm=str(record["arm"]),
                        lower=exposed_at - CLOCK_SKEW_S,
                        upper=exposed_at + float(entry["window_s"]),
                    )
                )
            elif event.type in WINDOW_TYPES:
                for experiment_id, entry in entries.items():
                    if (experiment_id, event.visitor_id) in heads:
                        values = outcome_values(event, "recommend")
                        window = float(entry["window_s"])
                        writes.append(
                            OutcomeWrite(
                                experiment_id, event.visitor_id, event.event_id, event.ts, values, window_s=window
                            )
                        )
        if not writes:
            return
        for write, applied in zip(writes, self.store.record_outcomes(writes), strict=True):
            key = entries[write.experiment_id]["key"]
            OUTCOMES.labels(key, applied.status).inc()
            if applied.status == "ok":
                count_increments(key, applied.arm, applied.increments)
