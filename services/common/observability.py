"""Metrics and logging plumbing shared by both services.

Metric names carry the `selaras_` prefix; labels only take bounded values (route templates, status classes,
slot kinds, experiment keys) and never a visitor id.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNTRACKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

HTTP_REQUESTS = Counter(
    "selaras_http_requests_total",
    "HTTP requests by service, route template, method and status class",
    ["service", "route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "selaras_http_request_duration_seconds",
    "HTTP request latency by service and route template",
    ["service", "route", "method"],
    buckets=LATENCY_BUCKETS,
)


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/profiles/{visitor_id}`), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: cheaper than BaseHTTPMiddleware on the hot path."""

    def __init__(self, app: ASGIApp, service: str):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = route_template(scope)
            method = scope.get("method", "GET")
            HTTP_LATENCY.labels(self.service, route, method).observe(time.perf_counter() - started)
            HTTP_REQUESTS.labels(self.service, route, method, f"{status // 100}xx").inc()


def metrics_payload() -> tuple[bytes, str]:
    """Exposition text; aggregates worker files when several workers share SELARAS_METRICS_DIR."""
    if os.environ.get("SELARAS_METRICS_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line. Callers never log visitor ids or event payloads (privacy)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log prints request paths, which can contain visitor ids: keep it off.
    logging.getLogger("uvicorn.access").disabled = True
    # Feast logs every registry cache refresh at INFO (once a minute per process): routine, not news.
    if root.level == logging.INFO:
        logging.getLogger("feast.infra.registry.registry").setLevel(logging.WARNING)
