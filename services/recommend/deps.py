"""What the recommend service's endpoints depend on: the typed state the app builds once in its lifespan
(`app.build_state`), and the API-key dependencies. Endpoints import this module, never `app.py`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.common.api import require_scope
from services.common.auth import ApiKeyAuth
from services.common.breaker import StoreGuard
from services.experiments.deps import ExperimentsState
from services.messages.deps import MessagesState
from services.recommend.repository import RecommendRepository
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings


@dataclass
class RecommendState:
    settings: RecommendSettings
    repository: RecommendRepository
    service: RecommendService
    messages: MessagesState  # also the message routes' state (app.state.messages)
    auth: ApiKeyAuth
    executor: ThreadPoolExecutor
    experiments: ExperimentsState  # also the experiment routes' state (app.state.experiments)
    # The visitor reads of /v1/recommend: off the event loop, within a budget, behind a circuit breaker.
    store_guard: StoreGuard


def get_state(request: Request) -> RecommendState:
    state: RecommendState = request.app.state.recommend
    return state


def get_auth(request: Request) -> ApiKeyAuth:
    return get_state(request).auth


State = Annotated[RecommendState, Depends(get_state)]
RecommendKey = Annotated[str, Depends(require_scope(get_auth, "recommend"))]
AdminKey = Annotated[str, Depends(require_scope(get_auth, "admin"))]
