"""HTTP routes of the recommend service."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from services.common.api import (
    FastJSONResponse,
    PathId,
    json_body_schema,
    parse_json_request,
)
from services.common.errors import StorageUnavailable
from services.recommend.deps import AdminKey, RecommendKey, State
from services.recommend.ranking.item2item import Strategy
from services.recommend.schemas import (
    RecommendRequest,
    RecommendResponse,
    ReloadResult,
    SimilarItems,
)
from services.recommend.service import StoredVisitor

router = APIRouter()
REQUEST_ADAPTER: TypeAdapter[RecommendRequest] = TypeAdapter(RecommendRequest)


@router.post(
    "/v1/recommend",
    response_model=RecommendResponse,
    openapi_extra=json_body_schema(RecommendRequest),
    responses={422: {"description": "Invalid request, by field"}},
)
async def recommend(request: Request, state: State, key: RecommendKey) -> Response:
    """Rank products, banners and CTAs for a visitor, one list per slot.

    Slot strategies: `personal` (default); `similar` and `bought_together` rank the neighbours of
    `context.item_ids` (a product page's item, the cart), never the anchors themselves, re-ranked by the model
    for a known visitor, in neighbour order otherwise; `rerank` orders the shop's own `candidate_ids` (1 to 1000
    search or category results) for the visitor with the same rules, explanations and impression logging.
    Unknown ids in `context.item_ids` are a 422 naming `context.item_ids.<i>`; unknown `candidate_ids` are
    ignored and counted in the slot's `unknown_candidates` (a search index may know items the catalog does
    not yet)."""
    parsed = await parse_json_request(request, REQUEST_ADAPTER, state.settings.max_body_bytes)
    may_set_time = state.auth.is_admin(key)
    personal = not state.auth.is_browser(key)  # a public (browser) key never reads a visitor's behaviour
    service = state.service
    # The only storage reads of ranking, awaited off the event loop: a stalled Redis costs this request at most
    # the budget (then the breaker skips the reads), never the other requests or /healthz.
    try:
        stored = await state.store_guard.run(partial(service.read_visitor, parsed.visitor_id))
    except StorageUnavailable:
        stored = StoredVisitor.UNAVAILABLE
    if state.settings.rank_on_event_loop:
        # ~5 ms of CPU under the GIL: a thread would add hand-offs, not parallelism (workers are the cores).
        result = service.recommend(parsed, may_set_time, personal, stored)
    else:
        result = await asyncio.get_running_loop().run_in_executor(
            state.executor, service.recommend, parsed, may_set_time, personal, stored
        )
    return FastJSONResponse(result)


@router.get(
    "/v1/items/{item_id}/similar",
    response_model=SimilarItems,
    responses={404: {"description": "Unknown item"}, 422: {"description": "Invalid strategy or limit"}},
)
async def similar_items(
    item_id: PathId,
    state: State,
    _: RecommendKey,
    strategy: Annotated[Strategy, Query(description="similar (attributes) or bought_together")] = "similar",
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Response:
    """An item's neighbours among available products, the same for every visitor: no personal data is read and
    nothing is logged (for a personal widget use a `similar` or `bought_together` slot of /v1/recommend)."""
    result = await run_in_threadpool(state.service.similar_items, item_id, strategy, limit)
    return FastJSONResponse(result)


@router.post("/v1/admin/reload", response_model=ReloadResult)
async def reload(state: State, _: AdminKey, version: str | None = None) -> ReloadResult:
    """Load the newest compatible model (or `version`), the versions experiment arms name, and rebuild the item
    cache, without dropping requests."""
    current, previous = await run_in_threadpool(state.service.reload_model, version)
    await run_in_threadpool(state.service.load_arm_models)
    await run_in_threadpool(state.service.refresh_cache)
    return ReloadResult(
        model_version=current,
        previous_version=previous,
        detail={"skipped": state.service.skipped_models, "items": state.service.snapshot.size},
    )


@router.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    # Liveness: on the event loop (no thread hand-off) and never touches storage, so a stalled Redis cannot
    # make the orchestrator restart healthy pods.
    return {"status": "alive"}


@router.get("/readyz", include_in_schema=False)
def readyz(state: State) -> Response:
    service = state.service
    breaker = state.store_guard.breaker.state
    body = {
        "ready": service.ready,
        # Degraded, still ready: every replica shares the store, so taking pods out would not help; the open
        # breaker means answers are the fallback ranking until the store answers again.
        "store": breaker,
        "degraded": breaker != "closed",
        "model_version": service.model.meta.version if service.model else None,
        "items": service.snapshot.size,
        "skipped_models": service.skipped_models,
    }
    return Response(orjson.dumps(body), status_code=200 if service.ready else 503, media_type="application/json")
