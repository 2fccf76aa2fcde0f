"""Request and answer shapes of the next-best-message endpoints (the answers are documented for clients;
the service builds them as plain dicts on the hot path)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.common.events import Identifier
from services.messages.settings import Channel


class MessageRequest(BaseModel):
    """Which message to send this visitor on this channel (and when)."""

    model_config = ConfigDict(extra="forbid")

    visitor_id: Identifier
    channel: Channel
    # The decision time; defaults to the service clock. Honoured only for admin keys or in a simulation
    # deployment (SELARAS_SIMULATION); the answer's `time` says which time was used.
    now: AwareDatetime | None = None
    # Preview only: nothing is recorded (caps, cooldowns, decision log).
    dry_run: bool = False
    # Also answer every eligible message with its expected uplift (debugging, CRM previews).
    explain: bool = False


class MessageBatchRequest(BaseModel):
    """Up to `max_batch` decisions in one call (push systems planning sends)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[MessageRequest] = Field(min_length=1, max_length=10_000)


class MessageContent(BaseModel):
    """The rendered message: tokens filled per channel (escaped for e-mail, plain text elsewhere)."""

    item_id: str
    name: str
    trigger: str
    title: str
    body: str
    locale: str
    tone: str
    deep_link: str | None = None


class MessageProduct(BaseModel):
    """The product a message is about (cart reminder, back in stock, price drop...)."""

    item_id: str
    title: str
    category: str | None = None
    price: float | None = None
    discount: float = 0.0
    url: str | None = None
    image_url: str | None = None


class ExperimentTag(BaseModel):
    key: str
    arm: str


class MessageDecision(BaseModel):
    """One decision: `action` "send" with the message and when to send it, or "none" with a `reason` code
    (consent, frequency_cap, cooldown, control_group, no_expected_uplift, unknown_visitor, ...) and a sentence."""

    model_config = ConfigDict(extra="allow")

    recommendation_id: str | None = Field(description="Echo it in the message's events (opens, clicks, purchases).")
    visitor_id: str
    channel: str
    action: Literal["send", "none"]
    reason: str | None = None
    detail: str | None = None
    message: MessageContent | None = None
    product: MessageProduct | None = None
    send_at: str | None = Field(default=None, description="ISO time to send at (the visitor's usual active hour).")
    planned_send_at: str | None = None
    reasons: list[str] | None = None
    score: float | None = None
    propensity: float | None = None
    experiment: ExperimentTag | None = None
    model_version: str | None = None
    dry_run: bool = False
    candidates: list[dict[str, Any]] | None = Field(default=None, description="With `explain`: every eligible one.")


class MessageBatchAnswer(BaseModel):
    count: int
    sent: int
    took_ms: float
    results: list[MessageDecision]


def none_answer(
    request: MessageRequest,
    reason: str,
    detail: str,
    experiment: tuple[Any, ...] | None = None,
    recommendation_id: str | None = None,
) -> dict[str, Any]:
    """The answer when no message is sent: why (`reason`, a fixed code) and a sentence (`detail`)."""
    return {
        "recommendation_id": recommendation_id,
        "visitor_id": request.visitor_id,
        "channel": request.channel,
        "action": "none",
        "reason": reason,
        "detail": detail,
        "experiment": {"key": experiment[0], "arm": experiment[1]} if experiment else None,
        "dry_run": request.dry_run,
    }
