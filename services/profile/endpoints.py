"""HTTP routes of the profile service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from services.common.api import FastJSONResponse, PathId, describe_errors, json_body_schema, read_json_body
from services.common.consent import Consent
from services.common.errors import Forbidden, InvalidPayload, NotFound, PayloadTooLarge, StorageUnavailable
from services.common.events import BROWSER_EVENT_TYPES, Event
from services.common.storage import partition_log
from services.features.aggregations import segments
from services.profile.deps import AdminKey, EventsKey, IngestKey, State
from services.profile.persona_jobs import persona_view
from services.profile.schemas import ConsentUpdate, EventBatch, IngestResult, ProfileView

router = APIRouter()
BATCH_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


@router.post(
    "/v1/events",
    status_code=202,
    response_model=IngestResult,
    openapi_extra=json_body_schema(EventBatch),
    responses={
        413: {"description": "Batch or body too large"},
        422: {"description": "Invalid events, by index and field"},
        503: {"description": "Events could not be stored durably; nothing was acknowledged, re-send"},
    },
)
async def ingest_events(request: Request, state: State, key: EventsKey) -> Response:
    """Ingest a batch of 1–1,000 behaviour events (idempotent on event_id)."""
    body = read_json_body(await request.body(), state.settings.max_body_bytes)
    raw_events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(raw_events, list) or not raw_events:
        raise InvalidPayload(
            'body must be {"events": [...]} with at least one event',
            extra={"errors": [{"field": "events", "message": "a non-empty list is required"}]},
        )
    limit = state.settings.max_batch_events
    if len(raw_events) > limit:
        raise PayloadTooLarge(f"batch has {len(raw_events)} events; the limit is {limit}")
    try:
        # One validation call for the whole batch; its errors carry the event index as the first location.
        events = BATCH_ADAPTER.validate_python(raw_events)
    except ValidationError as exc:
        errors = describe_errors(exc.errors(), index_after="events", prefix=("events",))
        raise InvalidPayload(
            f"{len({e['index'] for e in errors})} of {len(raw_events)} events are invalid; nothing was stored",
            extra={"errors": errors},
        ) from exc
    if "ingest" not in state.auth.scopes_of(key):
        refuse_beyond_collect(events)
    future = state.ingest.future_errors(events)
    if future:
        raise InvalidPayload(
            f"{len(future)} of {len(raw_events)} events are dated in the future; nothing was stored",
            extra={"errors": future},
        )
    traits = state.ingest.trait_errors(events)
    if traits:
        raise InvalidPayload(
            f"{len({e['index'] for e in traits})} of {len(raw_events)} events carry traits the declared schema "
            "refuses; nothing was stored",
            extra={"errors": traits},
        )
    # The durable append is a blocking call: run it in the thread pool, off the event loop.
    result = await run_in_threadpool(state.ingest.ingest, events)
    return FastJSONResponse({"accepted": result.accepted, "duplicates": result.duplicates}, status_code=202)


def refuse_beyond_collect(events: Sequence[Event]) -> None:
    """A browser (`collect`) key sends behaviour events of one visitor per request, nothing else: a public key
    must not be able to record purchases, change consent or traits, or write into other visitors' profiles."""
    errors = [
        {"index": i, "field": "type", "message": f"a collect key may not send {e.type.value} events"}
        for i, e in enumerate(events)
        if e.type not in BROWSER_EVENT_TYPES
    ]
    if len({e.visitor_id for e in events}) > 1:
        errors.append({"field": "visitor_id", "message": "a collect key sends events of one visitor per request"})
    if errors:
        raise Forbidden("this API key may only collect behaviour events of one visitor", extra={"errors": errors})


@router.get("/v1/profiles/{visitor_id}", response_model=ProfileView)
def get_profile(visitor_id: PathId, state: State, _: AdminKey) -> ProfileView:
    """The visitor's current features, segments, persona, traits and consent."""
    repo = state.repository
    states = repo.visitor_states([visitor_id])
    consent = repo.consents([visitor_id]).get(visitor_id, Consent())
    if visitor_id not in states and not consent.given:
        raise NotFound("unknown visitor")
    row = repo.online_visitor(visitor_id)
    row.pop("visitor_id", None)
    segment_names = ("lifecycle", "value_tier", "journey_stage", "price_sensitivity", "is_customer")
    visitor_state = states.get(visitor_id)
    # Segments as of now (lifecycle moves to at-risk/dormant with time alone); the online row's are as of
    # the visitor's latest event.
    live = segments(visitor_state, state.clock.now(), state.rules) if visitor_state else {}
    segments_view = {name: live.get(name, row.get(name)) for name in segment_names}
    traits = dict(visitor_state.traits) if visitor_state else {}
    persona = persona_view(state.personas.current(), row.get("persona_id"))
    return ProfileView(
        visitor_id=visitor_id,
        features={k: v for k, v in row.items() if k not in segment_names},
        segments=segments_view,
        persona=persona,
        traits=traits,
        consent=consent.resolved(state.consent_defaults),
    )


@router.put("/v1/profiles/{visitor_id}/consent")
def put_consent(visitor_id: PathId, update: ConsentUpdate, state: State, _: IngestKey) -> dict[str, Any]:
    """Record the visitor's consent per purpose (unset purposes keep their value)."""
    changes = {k: v for k, v in update.model_dump().items() if v is not None}
    # Merged into the stored record atomically: the aggregator writing a batch's consents at the same time
    # cannot overwrite this choice, nor this one a newer choice of the aggregator's.
    consent = state.repository.save_consents({visitor_id: Consent().merged(changes, state.clock.now())})[visitor_id]
    if not consent.allows("personalization", state.consent_defaults):
        state.privacy.withdraw_profile(visitor_id)  # no behavioural profile is kept without consent
    return {"visitor_id": visitor_id, "consent": consent.resolved(state.consent_defaults)}


@router.get("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", include_in_schema=False)
def readyz(state: State) -> Response:
    store_ok = state.repository.store.ping()
    aggregator_ok = state.aggregator.alive or not state.settings.aggregator_enabled
    ready = store_ok and aggregator_ok
    body: dict[str, Any] = {
        "ready": ready,
        "store": store_ok,
        "aggregator": aggregator_ok,
        "aggregator_error": state.aggregator.last_error,
    }
    if store_ok:
        # What every aggregator (in this process or its own) last published: lag, errors, dead letters. The
        # API stays ready while they lag (ingest still acknowledges); monitoring alerts on these values.
        try:
            statuses = state.repository.aggregator_statuses()
            body["aggregator_lag_s"] = max((s.get("lag_s", 0.0) for s in statuses.values()), default=None)
            body["aggregator_errors"] = {log: s["error"] for log, s in statuses.items() if s.get("error")}
            # Per partition, labelled by its number (never by visitor): lag and dead letters.
            body["aggregator_lag_by_partition"] = {
                str(s.get("partition", 0)): s.get("lag_s", 0.0) for s in statuses.values()
            }
            by_log = state.repository.dead_letter_counts()
            body["dead_letters"] = sum(by_log.values())
            body["dead_letters_by_partition"] = {
                str(p): by_log.get(partition_log(p), 0) for p in range(state.repository.partitions)
            }
        except StorageUnavailable:
            body["store"] = body["ready"] = ready = False
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")
