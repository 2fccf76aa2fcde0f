"""Who may enter an experiment: targeting conditions, evaluated before assignment (pure, no storage).

An experiment's optional `targeting` names conditions on the request context (device, city, channel) and on the
visitor's segments (persona, lifecycle, new vs returning). Each condition is a list of accepted values (any of
them matches); a condition left out accepts everybody; every given condition must match. A visitor who does not
match is not in the experiment: the request gets the default experience and no exposure is recorded, so the
visitor is not counted in the report.

Frozen at exposure: targeting decides who *enters*. A visitor already exposed keeps their arm when their
attributes change later (a new visitor who comes back next week is "returning" then, and must still be counted
in the arm they saw). The runtime asks the experiment store, which records each exposed visitor's arm
atomically with the sums, only for visitors who fail the conditions (runtime.py); see docs/statistics.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from services.features.aggregations import SESSION_GAP_S  # a request this long after the last event: new session

DeviceName = Literal["mobile", "desktop", "tablet", "app"]
Lifecycle = Literal["new", "active", "loyal", "at_risk", "dormant"]
Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


def _accepted(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(v.casefold() for v in values)


class ExperimentTargeting(BaseModel):
    """Conditions a visitor must meet to enter the experiment (all given ones; a list accepts any of its values).

    Text values (cities, channels, personas) compare without regard to case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[DeviceName] | None = Field(default=None, min_length=1, max_length=4)
    cities: list[Label] | None = Field(default=None, min_length=1, max_length=100)
    # The request's `context.channel` for recommendations (web, app, ...); the message channel (push, email,
    # ...) for next-best messages.
    channels: list[Label] | None = Field(default=None, min_length=1, max_length=20)
    # Persona names as the persona model names them (the report's persona breakdown shows the same names).
    personas: list[Label] | None = Field(default=None, min_length=1, max_length=50)
    lifecycles: list[Lifecycle] | None = Field(default=None, min_length=1, max_length=5)
    # "new": no session before the current one (or no stored profile); "returning": at least one.
    visitor: Literal["new", "returning"] | None = None

    @model_validator(mode="after")
    def _something(self) -> ExperimentTargeting:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("targeting needs at least one condition (leave targeting out to include everybody)")
        return self

    def matches(self, context: TargetingContext) -> bool:
        checks: tuple[tuple[list[str] | None, str | None], ...] = (
            (list(self.devices) if self.devices else None, context.device),
            (self.cities, context.city),
            (self.channels, context.channel),
            (self.personas, context.persona),
            (list(self.lifecycles) if self.lifecycles else None, context.lifecycle),
        )
        for values, actual in checks:
            accepted = _accepted(values)
            # An unknown attribute (no device sent, no stored profile) matches no condition on it.
            if accepted is not None and (actual is None or actual.casefold() not in accepted):
                return False
        return self.visitor is None or (self.visitor == "returning") == context.returning


@dataclass(frozen=True)
class TargetingContext:
    """What targeting reads about one request; None = unknown."""

    device: str | None = None
    city: str | None = None
    channel: str | None = None
    persona: str | None = None
    lifecycle: str | None = None
    returning: bool = False


UNKNOWN: Final = TargetingContext()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None


def is_returning(row: dict[str, Any] | None, now: float) -> bool:
    """Whether the visitor had a session before the current one, from the stored visitor row.

    A request more than the session gap after the last event starts a new session, so any stored event is from
    an earlier one; within the gap, the events before the current session are `event_count - session_depth`.
    No row (never seen, or not readable without consent): new."""
    if not row:
        return False
    events, depth = _number(row.get("event_count")), _number(row.get("session_depth"))
    last_seen = _number(row.get("last_seen_ts"))
    if not events:
        return False
    if last_seen is not None and now - last_seen > SESSION_GAP_S:
        return True
    return depth is not None and events > depth


def targeting_context(
    *,
    device: str | None,
    channel: str | None,
    city: str | None,
    row: dict[str, Any] | None,
    persona: str | None,
    now: float,
) -> TargetingContext:
    """The targeting attributes of a request: its context (device, channel; city, else the visitor's) and the
    visitor's stored row (lifecycle, returning) with the persona name the caller resolved from it."""
    stored = row or {}
    return TargetingContext(
        device=_text(device),
        city=_text(city) or _text(stored.get("city")),
        channel=_text(channel),
        persona=_text(persona),
        lifecycle=_text(stored.get("lifecycle")),
        returning=is_returning(row, now),
    )
