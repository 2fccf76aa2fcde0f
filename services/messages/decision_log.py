"""The logged decision: how a next-best-message decision is written to the event log (a `message_sent`
event) and to the recommendation record, and how its candidates are read back by the replay.

Decisions that send nothing on purpose are logged too, with `item_id` "none" and `properties.action`
"none": they are the comparison that uplift training and offline evaluation need."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from services.common.events import Event, EventContext, EventType

NONE_ACTION: Final = "none"


class _Ids:
    """Recommendation ids: a random 64-bit prefix per process plus a counter (uuid4 per decision costs a syscall)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prefix = uuid.uuid4().hex[:16]
        self._count = 0

    def __call__(self) -> str:
        with self._lock:
            self._count += 1
            if self._count >= 1 << 60:
                self._prefix, self._count = uuid.uuid4().hex[:16], 1
            return f"{self._prefix}{self._count:016x}"


next_id = _Ids()


def encode_candidates(pairs: Iterable[tuple[str, str | None]]) -> str:
    """`template:product|template:` — the actions a decision could choose (besides sending nothing)."""
    return "|".join(f"{template}:{product or ''}" for template, product in pairs)


def decode_candidates(text: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for part in filter(None, text.split("|")):
        template, _, product = part.partition(":")
        out.append((template, product or None))
    return out


@dataclass(frozen=True, slots=True)
class DecisionEntry:
    """One decision as it is logged. `template_id` None: nothing was sent."""

    recommendation_id: str
    visitor_id: str
    channel: str
    city: str | None
    decided_at: float  # the decision's business time
    send_at: datetime  # when the message goes (or would have gone) out, in the visitor's zone
    propensity: float  # what the logging policy gave the logged action (offline evaluation divides by it)
    control: bool  # the random control group
    reason: str
    candidates: str  # encode_candidates of the eligible messages
    model_version: str | None
    experiment: tuple[str, str] | None
    persona: int | None
    template_id: str | None = None
    trigger: str | None = None
    product_id: str | None = None
    tone: str = ""
    score: float = 0.0

    def event(self) -> Event:
        """The `message_sent` event (event id `msg:<recommendation_id>`: a CRM posting it again is deduplicated)."""
        properties: dict[str, Any] = {
            "action": "send" if self.template_id is not None else "none",
            "channel": self.channel,
            "propensity": round(self.propensity, 6),
            "candidates": self.candidates[:512],
            "decided_at": round(self.decided_at, 3),
            "control": self.control,
            "reason": self.reason,
            "score": round(self.score, 6),
        }
        if self.template_id is not None:
            properties["trigger"] = self.trigger
            properties["tone"] = self.tone
        if self.product_id:
            properties["product_id"] = self.product_id
        if self.model_version:
            properties["model"] = self.model_version
        if self.experiment:
            properties["experiment"], properties["arm"] = self.experiment
        return Event(
            event_id=f"msg:{self.recommendation_id}",
            visitor_id=self.visitor_id,
            type=EventType.MESSAGE_SENT,
            timestamp=self.send_at.astimezone(UTC),
            item_id=self.template_id if self.template_id is not None else NONE_ACTION,
            recommendation_id=self.recommendation_id,
            context=EventContext(channel=self.channel, city=self.city),
            properties=properties,
        )

    def record(self) -> dict[str, Any]:
        """The recommendation record of the decision."""
        return {
            "visitor_id": self.visitor_id,
            "ts": self.decided_at,
            "kind": "message",
            "channel": self.channel,
            "message": self.template_id,
            "trigger": self.trigger,
            "product": self.product_id,
            "send_at": self.send_at.timestamp(),
            "control": self.control,
            "experiment": self.experiment[0] if self.experiment else None,
            "arm": self.experiment[1] if self.experiment else None,
            "persona": self.persona,
        }
