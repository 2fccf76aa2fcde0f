"""Request bodies of the next-best-message endpoints."""

from __future__ import annotations

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
