"""HTTP plumbing shared by both apps: error handlers, 422 formatting, auth dependency, health and metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from pathlib import Path as FilePath
from pathlib import PurePath
from typing import Annotated, Any, Final

import orjson
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import StringConstraints, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.auth import ApiKeyAuth
from services.common.errors import InvalidPayload, NotFound, PayloadTooLarge, SelarasError
from services.common.observability import metrics_payload

# A visitor or item id in a URL path, normalised like ids in bodies (`Identifier`: surrounding spaces stripped,
# 1..128 characters), so `/v1/profiles/%20v1` and an event for " v1" name the same visitor.
PathId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128), Path()]

log = logging.getLogger(__name__)


class FastJSONResponse(JSONResponse):
    """orjson-encoded responses: several times faster than the standard encoder on ranked lists."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def describe_errors(
    errors: Sequence[Any], index_after: str | None = None, prefix: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Pydantic errors -> [{"index": i?, "field": "a.b", "message": ...}].

    `index_after` names the list whose element index is reported separately (e.g. "events"); `prefix` is
    prepended to locations of errors from validating that list on its own."""
    described: list[dict[str, Any]] = []
    for error in errors:
        loc = [*prefix, *(part for part in error.get("loc", ()) if part != "body")]
        entry: dict[str, Any] = {}
        if index_after and len(loc) >= 2 and loc[0] == index_after and isinstance(loc[1], int):
            entry["index"] = loc[1]
            loc = loc[2:]
        # Drop pydantic's union/function tags such as "function-after[...]" from the field path.
        fields = [str(p) for p in loc if not (isinstance(p, str) and "[" in p)]
        entry["field"] = ".".join(fields) or "(root)"
        entry["message"] = str(error.get("msg", "invalid"))
        described.append(entry)
    return described


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SelarasError)
    async def selaras_error(_: Request, exc: SelarasError) -> Response:
        return FastJSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        errors = describe_errors(exc.errors())
        return FastJSONResponse(
            {"error": "InvalidPayload", "detail": f"{len(errors)} invalid field(s)", "errors": errors},
            status_code=422,
        )

    # Unknown routes, wrong methods and other HTTP errors raised by the framework: the same envelope.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        name = HTTP_ERROR_NAMES.get(exc.status_code) or HTTPStatus(exc.status_code).phrase.replace(" ", "")
        return FastJSONResponse(
            {"error": name, "detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    # A bug: the envelope without internals (the traceback goes to the log, never to the client).
    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return FastJSONResponse(
            {"error": "InternalError", "detail": "unexpected error; the service log has the details"}, status_code=500
        )


HTTP_ERROR_NAMES = {404: "NotFound", 405: "MethodNotAllowed"}


def read_json_body(raw: bytes, max_bytes: int) -> Any:
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(f"body is not valid JSON: {exc}") from exc


def json_body_schema(model: Any) -> dict[str, Any]:
    """`openapi_extra` for routes that parse their JSON body themselves (for clear 413/422 answers)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def parse_json_request(request: Request, adapter: Any, max_bytes: int) -> Any:
    """Read, size-check and validate a JSON body with a pydantic TypeAdapter; 413/422 on failure."""
    body = read_json_body(await request.body(), max_bytes)
    try:
        return adapter.validate_python(body)
    except ValidationError as exc:
        raise validation_failure(exc) from exc


def validation_failure(exc: ValidationError, index_after: str | None = None) -> InvalidPayload:
    errors = describe_errors(exc.errors(), index_after)
    return InvalidPayload(f"{len(errors)} invalid field(s)", extra={"errors": errors})


def api_key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    authorization = request.headers.get("authorization", "")
    return authorization[7:] if authorization.lower().startswith("bearer ") else None


def require_scope(auth: Callable[[Request], ApiKeyAuth], *scopes: str) -> Callable[[Request], str]:
    """A FastAPI dependency that authenticates the request for one of `scopes` and returns the key name.
    The scopes are kept on the function (`required_scopes`) so a test can check every route against a list."""

    def dependency(request: Request) -> str:
        return auth(request).authenticate(api_key_of(request), *scopes)

    dependency.required_scopes = frozenset(scopes)  # type: ignore[attr-defined]
    return dependency


def add_metrics_route(app: FastAPI) -> None:
    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        payload, content_type = metrics_payload()
        return Response(payload, media_type=content_type)


def install_openapi_components(app: FastAPI) -> None:
    """Make the request bodies documented with `openapi_extra` resolvable.

    They embed pydantic's schema, whose `$ref`s point at `#/$defs/...`; in an OpenAPI document that path is
    resolved from the root, where nothing is, so /docs, generated clients and fuzzers saw no body schema. The
    definitions move to `components/schemas` (an existing component of the same name is kept: FastAPI already
    generated it from the same model) and the references follow."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})

        def move(node: Any) -> None:
            if isinstance(node, dict):
                for name, definition in (node.pop("$defs", None) or {}).items():
                    move(definition)
                    components.setdefault(name, definition)
                ref = node.get("$ref")
                if isinstance(ref, str) and ref.startswith("#/$defs/"):
                    node["$ref"] = "#/components/schemas/" + ref.removeprefix("#/$defs/")
                for value in node.values():
                    move(value)
            elif isinstance(node, list):
                for value in node:
                    move(value)

        move(schema.get("paths", {}))
        document_errors_and_security(app, schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorBody",
    "description": "Every answer that is not a success: the error's name, a sentence, and for 422 the fields.",
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "examples": ["InvalidPayload"]},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {
                    "index": {"type": "integer", "description": "position in the batch, for batch bodies"},
                    "field": {"type": "string", "examples": ["events.timestamp"]},
                    "message": {"type": "string"},
                },
            },
        },
    },
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
AUTH_ERRORS = {
    "401": "No API key, or an unknown one",
    "403": "The key lacks the scope this route needs",
    "429": "Rate limit of the key (or browser client) reached; see Retry-After",
}


def api_routes(routes: Sequence[Any]) -> Iterator[APIRoute]:
    """Every API route, those of included routers too (this FastAPI keeps them behind a wrapper)."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            yield from api_routes(original.routes)
        elif isinstance(route, APIRoute):
            yield route


def route_scopes(route: APIRoute) -> frozenset[str] | None:
    """The scopes a route's key dependency accepts (`require_scope`), or None for an open route."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        scopes = getattr(dependant.call, "required_scopes", None)
        if scopes is not None:
            return frozenset(scopes)
        pending.extend(dependant.dependencies)
    return None


def document_errors_and_security(app: FastAPI, schema: dict[str, Any]) -> None:
    """What generated clients need and FastAPI does not write: the API-key security schemes on the routes that
    require a key (with 401/403/429), and the one error envelope as the body of every error response (FastAPI
    documents its own 422 shape, which this service never sends)."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["ErrorBody"] = ERROR_SCHEMA
    components["securitySchemes"] = {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer", "description": "the same API key as a bearer token"},
    }
    routes = {(r.path, method.lower()): r for r in api_routes(app.routes) for method in (r.methods or ())}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            route = routes.get((path, method))
            if route is None:
                continue
            responses = operation.setdefault("responses", {})
            scopes = route_scopes(route)
            if scopes is not None:
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
                listed = " or ".join(sorted(scopes))
                operation["description"] = (operation.get("description") or "") + f"\n\nAPI key scope: {listed}."
                for status, text in AUTH_ERRORS.items():
                    responses.setdefault(status, {"description": text})
            responses.setdefault("500", {"description": "Unexpected error (details only in the service log)"})
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    response["content"] = {"application/json": {"schema": ERROR_REF}}
                    if status == "422" and response.get("description") == "Validation Error":
                        response["description"] = "Invalid request, by field"
    # Nothing refers to FastAPI's own validation shapes any more.
    for unused in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(unused, None)


# The admin pages (/experiments, /reports/) talk only to the service that serves them and run only its scripts.
ADMIN_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ASSET_MEDIA_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


class StaticPages:
    """A page's files shipped in a package folder: the page itself and the assets it names, nothing else (a
    name outside `assets` is a 404, so no path can escape the folder)."""

    def __init__(self, folder: FilePath, assets: Sequence[str]):
        self.folder = folder
        self.assets = frozenset(assets)

    def response(self, name: str) -> Response:
        media_type = ASSET_MEDIA_TYPES[PurePath(name).suffix]
        return Response((self.folder / name).read_bytes(), media_type=media_type, headers=ADMIN_PAGE_HEADERS)

    def asset(self, name: str) -> Response:
        if name not in self.assets:
            raise NotFound("no such asset")
        return self.response(name)
