"""Catalog routes: bulk upsert, read and list, partial update (price, stock, ...) and delete of items.

Every change bumps the catalog version, so each replica's item cache rebuilds within `refresh_interval_s`.
A partial update is a compare-and-set on the stored item: two PATCHes racing (a price feed and a stock feed)
both land; the merged item is validated like a new one (422 naming the field).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from starlette.concurrency import run_in_threadpool

from services.common.api import FastJSONResponse, PathId, json_body_schema, read_json_body, validation_failure
from services.common.catalog import CatalogItem, ItemKind
from services.common.errors import InvalidPayload, NotFound, PayloadTooLarge
from services.recommend.deps import AdminKey, State
from services.recommend.schemas import CatalogUpsert, CatalogUpsertResult

router = APIRouter(tags=["catalog"])
ITEM_ADAPTER: TypeAdapter[CatalogItem] = TypeAdapter(CatalogItem)


class CatalogPage(BaseModel):
    items: list[CatalogItem]
    next_after: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


# Documented body of PATCH: every item field but `item_id`, each optional (`null` clears an optional field).
ItemPatch: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "ItemPatch",
    __config__=ConfigDict(extra="forbid"),
    **{
        name: (Optional[field.annotation], None)  # noqa: UP045 (a type built at run time)
        for name, field in CatalogItem.model_fields.items()
        if name != "item_id"
    },
)


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
    """Insert or replace catalog items (products, banners, CTAs, message templates)."""
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


@router.get("/v1/catalog/items", response_model=CatalogPage)
async def list_items(
    state: State,
    _: AdminKey,
    kind: ItemKind | None = None,
    after: Annotated[str | None, Query(max_length=128, description="Item id the previous page ended at")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> CatalogPage:
    """Items in id order, a page at a time (reads the whole catalog: for admin tools, not for the storefront)."""
    items = await run_in_threadpool(state.repository.catalog)
    chosen = sorted(
        (i for i in items if (kind is None or i.kind is kind) and (after is None or i.item_id > after)),
        key=lambda i: i.item_id,
    )
    page = chosen[:limit]
    return CatalogPage(items=page, next_after=page[-1].item_id if len(chosen) > limit else None)


@router.get("/v1/catalog/items/{item_id}", response_model=CatalogItem, responses={404: {"description": "No such item"}})
async def get_item(state: State, _: AdminKey, item_id: PathId) -> CatalogItem:
    item = await run_in_threadpool(state.repository.catalog_item, item_id)
    if item is None:
        raise NotFound(f"no catalog item {item_id!r}")
    return item


@router.patch(
    "/v1/catalog/items/{item_id}",
    response_model=CatalogItem,
    openapi_extra=json_body_schema(ItemPatch),
    responses={404: {"description": "No such item"}, 422: {"description": "Invalid fields, by field"}},
)
async def patch_item(request: Request, state: State, _: AdminKey, item_id: PathId) -> CatalogItem:
    """Change some fields of an item (e.g. `{"price": 79000, "stock": 3}`) without resending the rest."""
    body = read_json_body(await request.body(), state.settings.max_body_bytes)
    if not isinstance(body, dict) or not body:
        raise InvalidPayload(
            "body must be a JSON object with the fields to change",
            extra={"errors": [{"field": "body", "message": "a non-empty object is required"}]},
        )
    if "item_id" in body:
        raise InvalidPayload(
            "item_id cannot be changed (delete the item and create it under the new id)",
            extra={"errors": [{"field": "item_id", "message": "cannot be changed"}]},
        )

    def merge(current: CatalogItem) -> CatalogItem:
        try:
            return ITEM_ADAPTER.validate_python({**current.model_dump(mode="json"), **body})
        except ValidationError as exc:
            raise validation_failure(exc) from exc

    updated = await run_in_threadpool(state.repository.update_catalog_item, item_id, merge)
    if updated is None:
        raise NotFound(f"no catalog item {item_id!r}")
    return updated


@router.delete("/v1/catalog/items/{item_id}", status_code=204, responses={404: {"description": "No such item"}})
async def delete_item(state: State, _: AdminKey, item_id: PathId) -> Response:
    """Remove an item: it leaves every replica's item cache at its next refresh and is never recommended again."""
    if not await run_in_threadpool(state.repository.delete_catalog_item, item_id):
        raise NotFound(f"no catalog item {item_id!r}")
    return Response(status_code=204)
