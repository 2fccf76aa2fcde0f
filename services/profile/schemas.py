"""Request and response bodies of the profile service."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.common.events import Event


class EventBatch(BaseModel):
    """Documented request body of POST /v1/events (the endpoint validates event by event for clear errors)."""

    events: list[Event] = Field(min_length=1, max_length=1000)


class IngestResult(BaseModel):
    accepted: int
    duplicates: int


class ConsentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    personalization: bool | None = None
    analytics: bool | None = None
    marketing_push: bool | None = None
    marketing_email: bool | None = None
    marketing_whatsapp: bool | None = None


class ProfileView(BaseModel):
    visitor_id: str
    features: dict[str, Any]
    segments: dict[str, Any]
    persona: dict[str, Any] | None
    traits: dict[str, Any]
    consent: dict[str, bool]
