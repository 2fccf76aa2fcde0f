"""Audiences: the visitors of a segment or persona, exported for a newsletter, a push or WhatsApp broadcast.

A row holds the pseudonymous visitor id, the persona and the segments as of `now` (the same segment rules as
the live service). With a channel, only visitors whose consent allows marketing on that channel are exported:
a list for a broadcast must not reach anyone who refused it. Erased visitors have no state and never appear.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Final

from services.common.consent import Consent, ConsentDefaults
from services.features.aggregations import SegmentRules, VisitorState, segments

CHANNELS: Final = ("push", "email", "whatsapp")
SEGMENT_COLUMNS: Final = ("lifecycle", "value_tier", "journey_stage", "price_sensitivity", "is_customer")
COLUMNS: Final = ("visitor_id", "persona_id", *SEGMENT_COLUMNS, "orders", "last_seen")


class InvalidAudience(ValueError):
    """A filter that names no segment column, or a channel that does not exist."""


@dataclass(frozen=True)
class AudienceFilter:
    """Who is in: every condition holds (`segments`: column -> allowed values; `personas`: any of them)."""

    segments: Mapping[str, frozenset[str]] = field(default_factory=dict)
    personas: frozenset[int] = frozenset()
    channel: str | None = None

    @classmethod
    def parse(cls, conditions: Sequence[str], personas: Sequence[int], channel: str | None) -> AudienceFilter:
        """`conditions` like "lifecycle=at_risk" (repeat a column for "any of")."""
        wanted: dict[str, set[str]] = {}
        for condition in conditions:
            column, sep, value = condition.partition("=")
            column, value = column.strip(), value.strip()
            if not sep or not value:
                raise InvalidAudience(f"{condition!r}: write a condition as column=value (e.g. lifecycle=at_risk)")
            if column not in SEGMENT_COLUMNS:
                raise InvalidAudience(f"{column!r} is not a segment column; use one of {', '.join(SEGMENT_COLUMNS)}")
            wanted.setdefault(column, set()).add(value)
        if channel is not None and channel not in CHANNELS:
            raise InvalidAudience(f"channel {channel!r} is not one of {', '.join(CHANNELS)}")
        return cls({k: frozenset(v) for k, v in wanted.items()}, frozenset(personas), channel)

    def admits(self, row: Mapping[str, Any]) -> bool:
        if self.personas and row["persona_id"] not in self.personas:
            return False
        return all(str(row[column]) in values for column, values in self.segments.items())


@dataclass
class AudienceCount:
    visitors: int = 0  # visitor states read
    matched: int = 0  # rows in the audience
    without_consent: int = 0  # matched the segments but refused (or never gave) marketing on the channel


def audience_rows(
    states: Iterable[Sequence[VisitorState]],
    consents: Callable[[Sequence[str]], Mapping[str, Consent]],
    rules: SegmentRules,
    defaults: ConsentDefaults,
    now: float,
    audience: AudienceFilter,
    count: AudienceCount,
) -> Iterator[dict[str, Any]]:
    """The audience's rows, chunk by chunk (`states` yields chunks, so consent is read once per chunk)."""
    for chunk in states:
        count.visitors += len(chunk)
        rows = []
        for state in chunk:
            row = {
                "visitor_id": state.visitor_id,
                "persona_id": state.persona_id,
                **segments(state, now, rules),
                "orders": state.orders,
                "last_seen": datetime.fromtimestamp(state.last_seen, tz=UTC).isoformat() if state.last_seen else "",
            }
            if audience.admits(row):
                rows.append(row)
        if audience.channel is not None and rows:
            choices = consents([row["visitor_id"] for row in rows])
            purpose = f"marketing_{audience.channel}"
            allowed = [r for r in rows if choices.get(r["visitor_id"], Consent()).allows(purpose, defaults)]
            count.without_consent += len(rows) - len(allowed)
            rows = allowed
        count.matched += len(rows)
        yield from rows


def write_csv(rows: Iterable[Mapping[str, Any]], handle: IO[str]) -> None:
    writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: row[column] for column in COLUMNS})
