"""Admin routes of the model registry: which versions of each kind exist, which one serves, and the pin.

Pinning is how a rollback is done: the pin is stored (services/common/models.py), this replica reloads at
once, and every other replica and worker follows within `refresh_interval_s` (ranker), the message model's
`model_check_interval_s`, or the persona assigner's check interval, without a call per replica.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from services.common.clock import wall_time
from services.common.models import ModelIndex, ModelKind
from services.recommend.deps import AdminKey, RecommendState, State

router = APIRouter(tags=["models"])


class ProductionChoice(BaseModel):
    version: str | None = Field(
        description="The version every replica serves from now on; null clears the pin (serve the newest).",
        min_length=1,
        max_length=200,
    )


class ModelVersionOut(BaseModel):
    version: str
    created_at: float
    sha256: str


class ModelIndexOut(BaseModel):
    kind: ModelKind
    versions: list[ModelVersionOut] = Field(description="Newest first.")
    newest: str | None
    pinned: str | None
    pinned_at: float | None
    serving: str | None = Field(description="What every process converges to: the pin, else the newest.")
    loaded_here: str | None = Field(description="What this replica serves now (ranker and message model).")


def _loaded_here(state: RecommendState, kind: ModelKind) -> str | None:
    if kind is ModelKind.RANKER:
        return state.service.model.meta.version if state.service.model else None
    if kind is ModelKind.MESSAGE:
        model = state.messages.service.model
        return model.version if model else None
    return None  # personas are assigned by the profile aggregator


def _answer(state: RecommendState, index: ModelIndex) -> ModelIndexOut:
    return ModelIndexOut.model_validate({**index.public(), "loaded_here": _loaded_here(state, index.kind)})


@router.get("/v1/admin/models/{kind}", response_model=ModelIndexOut)
async def list_models(state: State, _: AdminKey, kind: ModelKind) -> ModelIndexOut:
    """Published versions of one kind of model, newest first, and which one serves."""
    index = await run_in_threadpool(state.repository.models.index, kind)
    return _answer(state, index)


@router.post(
    "/v1/admin/models/{kind}/production",
    response_model=ModelIndexOut,
    responses={404: {"description": "The version was never published for this kind"}},
)
async def set_production(state: State, _: AdminKey, kind: ModelKind, choice: ProductionChoice) -> ModelIndexOut:
    """Pin the version every replica serves (a rollback survives restarts and autoscaling), or clear the pin.
    Later trainings still publish, but do not serve until the pin is cleared."""
    index = await run_in_threadpool(state.repository.models.set_production, kind, choice.version, wall_time())
    if kind is ModelKind.RANKER:
        await run_in_threadpool(state.service.reload_model)
    elif kind is ModelKind.MESSAGE:
        await run_in_threadpool(state.messages.service.follow_model_registry)
    return _answer(state, index)
