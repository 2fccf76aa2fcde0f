"""Next-best-message routes of the recommend service."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError

from services.common.api import (
    FastJSONResponse,
    json_body_schema,
    parse_json_request,
    read_json_body,
    validation_failure,
)
from services.common.errors import InvalidPayload, PayloadTooLarge
from services.messages.deps import MessagesKey, MessagesState, State
from services.messages.schemas import MessageBatchAnswer, MessageBatchRequest, MessageDecision, MessageRequest
from services.messages.service import MessageService

router = APIRouter()
REQUEST_ADAPTER: TypeAdapter[MessageRequest] = TypeAdapter(MessageRequest)
BATCH_ADAPTER: TypeAdapter[MessageBatchRequest] = TypeAdapter(MessageBatchRequest)


def install_message_service(app: FastAPI, service: MessageService) -> None:
    """Serve next-best messages with `service` instead of the one the app built (tests with other settings)."""
    state: MessagesState = app.state.messages
    state.service = service


@router.post(
    "/v1/next-best-message",
    response_model=MessageDecision,
    openapi_extra=json_body_schema(MessageRequest),
    responses={422: {"description": "Invalid request, by field"}},
)
async def next_best_message(request: Request, state: State, key: MessagesKey) -> Response:
    """The message to send a visitor next on a channel, with its send time, or `{"action": "none", "reason": ...}`."""
    parsed = await parse_json_request(request, REQUEST_ADAPTER, state.max_body_bytes)
    service = state.service
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(state.executor, service.decide, parsed, state.auth.is_admin(key))
    return FastJSONResponse(result)


@router.post(
    "/v1/next-best-message:batch",
    response_model=MessageBatchAnswer,
    openapi_extra=json_body_schema(MessageBatchRequest),
    responses={
        413: {"description": "More requests than the batch limit"},
        422: {"description": "Invalid requests, by index and field"},
    },
)
async def next_best_message_batch(request: Request, state: State, key: MessagesKey) -> Response:
    """Next-best messages for up to 1,000 visitors in one call (push systems planning their sends)."""
    started = time.perf_counter()
    body = read_json_body(await request.body(), state.max_body_bytes * 16)
    service = state.service
    raw = body.get("requests") if isinstance(body, dict) else None
    if isinstance(raw, list) and len(raw) > service.settings.max_batch:
        raise PayloadTooLarge(f"batch has {len(raw)} requests; the limit is {service.settings.max_batch}")
    if not isinstance(raw, list):
        raise InvalidPayload(
            'body must be {"requests": [...]}',
            extra={"errors": [{"field": "requests", "message": "a non-empty list is required"}]},
        )
    try:
        parsed = BATCH_ADAPTER.validate_python(body)
    except ValidationError as exc:
        raise validation_failure(exc, index_after="requests") from exc
    loop = asyncio.get_running_loop()
    results = await loop.run_in_executor(
        state.executor, service.decide_batch, parsed.requests, state.auth.is_admin(key)
    )
    return FastJSONResponse(
        {
            "count": len(results),
            "sent": sum(1 for r in results if r["action"] == "send"),
            "took_ms": round((time.perf_counter() - started) * 1000, 3),
            "results": results,
        }
    )
