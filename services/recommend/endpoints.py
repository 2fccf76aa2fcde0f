"""HTTP routes of the recommend service."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from services.common.api import (
    FastJSONResponse,
    json_body_schema,
    parse_json_request,
    read_json_body,
    validation_failure,
)
from services.common.catalog import CatalogItem
from services.common.errors import InvalidPayload, PayloadTooLarge
from services.recommend.deps import AdminKey, RecommendKey, State
from services.recommend.item2item import Strategy
from services.recommend.schemas import (
    CatalogUpsert,
    CatalogUpsertResult,
    RecommendRequest,
    RecommendResponse,
    ReloadResult,
    SimilarItems,
)

router = APIRouter()
ITEM_ADAPTER: TypeAdapter[CatalogItem] = TypeAdapter(CatalogItem)
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
    if state.settings.rank_on_event_loop:
        # ~5 ms of CPU under the GIL: a thread would add hand-offs, not parallelism (workers are the cores).
        result = state.service.recommend(parsed, may_set_time, personal)
    else:
        result = await asyncio.get_running_loop().run_in_executor(
            state.executor, state.service.recommend, parsed, may_set_time, personal
        )
    return FastJSONResponse(result)


@router.get(
    "/v1/items/{item_id}/similar",
    response_model=SimilarItems,
    responses={404: {"description": "Unknown item"}, 422: {"description": "Invalid strategy or limit"}},
)
async def similar_items(
    item_id: str,
    state: State,
    _: RecommendKey,
    strategy: Annotated[Strategy, Query(description="similar (attributes) or bought_together")] = "similar",
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Response:
    """An item's neighbours among available products, the same for every visitor: no personal data is read and
    nothing is logged (for a personal widget use a `similar` or `bought_together` slot of /v1/recommend)."""
    result = await run_in_threadpool(state.service.similar_items, item_id, strategy, limit)
    return FastJSONResponse(result)


@router.put(
    "/v1/catalog/items",
    response_model=CatalogUpsertResult,
    openapi_extra=json_body_schema(CatalogUpsert),
    responses={
        413: {"description": "Too many items"},
        422: {"description": "Invalid items, by index and field"},
    },
)
async def upsert_catalog(request: Request, state: State, _: AdminKey) -> Response:
    """Insert or update catalog items (products, banners, CTAs, message templates)."""
    body = read_json_body(await request.body(), state.settings.max_body_bytes * 16)
    raw_items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(raw_items, list) or not raw_items:
        raise InvalidPayload(
            'body must be {"items": [...]} with at least one item',
            extra={"errors": [{"field": "items", "message": "a non-empty list is required"}]},
        )
    if len(raw_items) > state.settings.max_catalog_batch:
        raise PayloadTooLarge(f"batch has {len(raw_items)} items; the limit is {state.settings.max_catalog_batch}")
    items: list[CatalogItem] = []
    errors: list[dict[str, Any]] = []
    for index, raw in enumerate(raw_items):
        try:
            items.append(ITEM_ADAPTER.validate_python(raw))
        except ValidationError as exc:
            for error in validation_failure(exc).extra["errors"]:
                errors.append({"index": index, **error})
    if errors:
        raise InvalidPayload(
            f"{len({e['index'] for e in errors})} of {len(raw_items)} items are invalid; nothing was stored",
            extra={"errors": errors},
        )
    await run_in_threadpool(state.repository.upsert_catalog, items)
    return FastJSONResponse({"upserted": len(items)})


@router.post("/v1/admin/reload", response_model=ReloadResult)
async def reload(state: State, _: AdminKey, version: str | None = None) -> ReloadResult:
    """Load the newest compatible model (or `version`) and rebuild the item cache, without dropping requests."""
    current, previous = await run_in_threadpool(state.service.reload_model, version)
    await run_in_threadpool(state.service.refresh_cache)
    return ReloadResult(
        model_version=current,
        previous_version=previous,
        detail={"skipped": state.service.skipped_models, "items": state.service.snapshot.size},
    )


@router.get("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", include_in_schema=False)
def readyz(state: State) -> Response:
    service = state.service
    body = {
        "ready": service.ready,
        "model_version": service.model.meta.version if service.model else None,
        "items": service.snapshot.size,
        "skipped_models": service.skipped_models,
    }
    return Response(orjson.dumps(body), status_code=200 if service.ready else 503, media_type="application/json")
