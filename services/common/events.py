"""The behaviour event contract shared by `/v1/events`, the durable log, imports and the simulator."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Self

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_PROPERTIES = 32
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
PropertyValue = str | int | float | bool | None


class EventType(StrEnum):
    PAGE_VIEW = "page_view"
    PRODUCT_VIEW = "product_view"
    SEARCH = "search"
    ADD_TO_CART = "add_to_cart"
    REMOVE_FROM_CART = "remove_from_cart"
    PURCHASE = "purchase"
    IMPRESSION = "impression"
    CLICK = "click"
    DISMISS = "dismiss"
    MESSAGE_SENT = "message_sent"
    MESSAGE_OPEN = "message_open"
    MESSAGE_CLICK = "message_click"
    PROFILE_UPDATE = "profile_update"


# What a browser (`collect` key, public) may send: behaviour on the shop's pages. Purchases (revenue, orders),
# profile updates (consent, traits), impressions and message events come from the shop's servers.
BROWSER_EVENT_TYPES = frozenset(
    {
        EventType.PAGE_VIEW,
        EventType.PRODUCT_VIEW,
        EventType.SEARCH,
        EventType.ADD_TO_CART,
        EventType.REMOVE_FROM_CART,
        EventType.CLICK,
        EventType.DISMISS,
    }
)

# Events that are about one catalog item and are meaningless without it.
ITEM_EVENT_TYPES = frozenset(
    {
        EventType.PRODUCT_VIEW,
        EventType.ADD_TO_CART,
        EventType.REMOVE_FROM_CART,
        EventType.PURCHASE,
        EventType.IMPRESSION,
        EventType.CLICK,
        EventType.DISMISS,
        EventType.MESSAGE_SENT,
    }
)
# Outcome events that experiments attribute to an exposure.
OUTCOME_EVENT_TYPES = frozenset(
    {
        EventType.CLICK,
        EventType.ADD_TO_CART,
        EventType.PURCHASE,
        EventType.MESSAGE_OPEN,
        EventType.MESSAGE_CLICK,
    }
)


class Device(StrEnum):
    MOBILE = "mobile"
    DESKTOP = "desktop"
    TABLET = "tablet"
    APP = "app"


class EventContext(BaseModel):
    """Where the visitor is: request context that travels with every event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Device | None = None
    channel: Annotated[str, StringConstraints(max_length=32)] | None = None
    city: Annotated[str, StringConstraints(max_length=64)] | None = None
    region: Annotated[str, StringConstraints(max_length=64)] | None = None
    locale: Annotated[str, StringConstraints(max_length=16)] | None = None
    referrer: ShortText | None = None
    session_id: Annotated[str, StringConstraints(max_length=128)] | None = None


class Event(BaseModel):
    """One behaviour event. `event_id` is chosen by the client and makes re-sending idempotent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Identifier
    visitor_id: Identifier
    type: EventType
    timestamp: AwareDatetime
    item_id: Identifier | None = None
    quantity: Annotated[int, Field(ge=1, le=10_000)] | None = None
    price: Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)] | None = None
    query: ShortText | None = None
    recommendation_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    context: EventContext = EventContext()
    properties: dict[Annotated[str, StringConstraints(max_length=64)], PropertyValue] = Field(
        default_factory=dict, max_length=MAX_PROPERTIES
    )

    @model_validator(mode="after")
    def _required_by_type(self) -> Event:
        if self.type in ITEM_EVENT_TYPES and self.item_id is None:
            raise ValueError(f"item_id is required for {self.type.value} events")
        if self.type is EventType.SEARCH and not self.query:
            raise ValueError("query is required for search events")
        for key, value in self.properties.items():
            if isinstance(value, str) and len(value) > 512:
                raise ValueError(f"properties.{key} is longer than 512 characters")
        return self

    @cached_property
    def ts(self) -> float:
        """Unix seconds: aggregations work on floats, not datetimes. Cached: a fold reads it ~8 times per event,
        and `datetime.timestamp` was 4% of a fold. The model is frozen, so only `model_copy` can change the time."""
        return self.timestamp.timestamp()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("ts", None)  # the original's cached time: an update may have moved the timestamp
        return copied


def future_timestamp_error(event: Event, now: float, max_skew_s: float) -> str | None:
    """Why the event is refused as coming from the future, or None. One event dated years ahead would
    otherwise become the item's and visitor's latest time and push every window and bucket out of range."""
    ahead = event.ts - now
    if ahead <= max_skew_s:
        return None
    return f"timestamp is {ahead:,.0f} s ahead of the service clock (at most {max_skew_s:,.0f} s allowed)"


def not_after(event: Event, latest: float) -> Event:
    """The event with its time capped at `latest`: folding never lets one event move an item's or visitor's
    time further ahead than the allowed skew (ingest refuses such events; this also covers older log entries
    and other writers)."""
    if event.ts <= latest:
        return event
    return event.model_copy(update={"timestamp": datetime.fromtimestamp(latest, tz=UTC)})


def envelope(event: Event, received_at: float) -> bytes:
    """A log entry: the event plus when it was acknowledged (for the feature-lag metric)."""
    # pydantic's JSON serialiser runs in Rust: much cheaper than model_dump + orjson per event.
    return b'{"at":%r,"event":%s}' % (received_at, event.model_dump_json(exclude_none=True).encode())


def envelope_visitor(raw: bytes) -> str | None:
    """The visitor id of a log entry, parsed (cheaper than `open_envelope`: no validation)."""
    event = orjson.loads(raw).get("event")
    visitor_id = event.get("visitor_id") if isinstance(event, dict) else None
    return visitor_id if isinstance(visitor_id, str) else None


def open_envelope(raw: bytes) -> tuple[float, Event]:
    data = orjson.loads(raw)
    return float(data["at"]), Event.model_validate(data["event"])
