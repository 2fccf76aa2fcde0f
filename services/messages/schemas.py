"""Request bodies of the next-best-message endpoints, and the answer that sends nothing."""

from __future__ import annotations

from typing import Any

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


def none_answer(
    request: MessageRequest,
    reason: str,
    detail: str,
    experiment: tuple[str, str] | tuple[str, str, bool] | None = None,
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
