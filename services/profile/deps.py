"""What the profile service's endpoints depend on: the typed state the app builds once in its lifespan
(`app.build_state`), and the API-key dependencies. Endpoints import this module, never `app.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.common.api import require_scope
from services.common.auth import ApiKeyAuth
from services.common.clock import Clock
from services.common.consent import ConsentDefaults
from services.features.aggregations import SegmentRules
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.persona_jobs import PersonaAssigner
from services.profile.privacy.service import PrivacyService
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings


@dataclass
class ProfileState:
    settings: ProfileSettings
    repository: ProfileRepository
    ingest: IngestService
    aggregator: Aggregator
    auth: ApiKeyAuth
    consent_defaults: ConsentDefaults
    rules: SegmentRules
    privacy: PrivacyService
    personas: PersonaAssigner
    clock: Clock


def get_state(request: Request) -> ProfileState:
    state: ProfileState = request.app.state.profile
    return state


def get_auth(request: Request) -> ApiKeyAuth:
    return get_state(request).auth


State = Annotated[ProfileState, Depends(get_state)]
IngestKey = Annotated[str, Depends(require_scope(get_auth, "ingest"))]
# POST /v1/events: server senders (`ingest`) or a browser (`collect`: its own visitor's behaviour only).
EventsKey = Annotated[str, Depends(require_scope(get_auth, "ingest", "collect"))]
AdminKey = Annotated[str, Depends(require_scope(get_auth, "admin"))]
