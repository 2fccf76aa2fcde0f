"""HTTP hardening shared by both apps: request size limits, per-key rate limits and CORS.

`install_security(app, settings)` adds three pure ASGI middlewares. From the outside in:
  CORS       -> answers preflights and adds CORS headers, also to 413/429 answers (so browsers can read them);
  rate limit -> one token bucket per API key (identified like the auth dependency does, by its SHA-256),
                and per client for a browser key (its secret is public: one client must not be able to drain
                the shop's whole limit); 429 with Retry-After when empty;
  size limit -> 413 for a body over the limit, by Content-Length or while reading a chunked body, so an
                oversized upload is never held in memory. The limit is `max_request_bytes` for server keys
                and `max_browser_request_bytes` for everything else (browser keys, no or unknown key): the
                key is identified before the body is read.
Authentication itself (401/403) stays in the route dependencies (services/common/api.py require_scope).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Sequence

import orjson
from fastapi import FastAPI
from prometheus_client import Counter
from starlette.middleware.cors import CORSMiddleware

from services.common.auth import BROWSER_SCOPES, ApiKey, hash_key, parse_keys
from services.common.errors import PayloadTooLarge, RateLimited, SelarasError
from services.common.observability import UNTRACKED_PATHS, ASGIApp, Message, Receive, Scope, Send
from services.common.ratelimit import (
    RATE_LIMIT_TIMEOUT_S,
    Limit,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    parse_limits,
)
from services.common.settings import CommonSettings

RATE_LIMITED = Counter("selaras_rate_limited_total", "Requests refused with 429, by API key name", ["key"])
TOO_LARGE = Counter("selaras_request_too_large_total", "Requests refused with 413 by the size limit")

ANONYMOUS = "anonymous"  # auth disabled (development)
UNAUTHENTICATED = "unauthenticated"  # auth enabled, no or unknown key: these get 401 anyway
CORS_HEADERS = ("content-type", "x-api-key", "authorization")


async def send_error(send: Send, error: SelarasError) -> None:
    """An error answer in the house format, sent from a middleware (outside FastAPI's handlers)."""
    body = orjson.dumps(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class KeyLookup:
    """Which API key a request presents, identified like the auth dependency does (by its SHA-256, every key
    compared so timing does not tell which matched), for the middlewares that run before authentication."""

    def __init__(self, keys: Sequence[ApiKey]):
        self.keys = list(keys)
        self.server_keys = frozenset(key.name for key in self.keys if not key.scopes <= BROWSER_SCOPES)

    def name_of(self, scope: Scope) -> str:
        if not self.keys:
            return ANONYMOUS
        presented = _header(scope, b"x-api-key")
        if not presented:
            authorization = _header(scope, b"authorization") or ""
            presented = authorization[7:] if authorization.lower().startswith("bearer ") else None
        if not presented:
            return UNAUTHENTICATED
        digest = hashlib.sha256(presented.encode()).digest()
        name = UNAUTHENTICATED
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                name = key.name
        return name

    def is_server(self, name: str) -> bool:
        """A server key, or development without keys (nothing is public then)."""
        return name == ANONYMOUS or name in self.server_keys


class BodySizeLimitMiddleware:
    """Reads the body up to the limit before the app runs; 413 as soon as it is exceeded.

    Buffering is bounded by the limit (the smaller one unless a server key is presented), and both apps read
    whole JSON bodies anyway."""

    def __init__(self, app: ASGIApp, max_bytes: int, keys: Sequence[ApiKey] = (), browser_max_bytes: int = 0):
        self.app = app
        self.max_bytes = max_bytes
        self.lookup = KeyLookup(keys)
        self.browser_max_bytes = browser_max_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes if self.lookup.is_server(self.lookup.name_of(scope)) else self.browser_max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, f"request body is {int(declared)} bytes", limit)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending the body: nothing to answer
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await self._refuse(send, f"request body exceeds {limit} bytes", limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later reads wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, what: str, limit: int) -> None:
        TOO_LARGE.inc()
        await send_error(send, PayloadTooLarge(f"{what}; the limit is {limit} bytes"))


class RateLimitMiddleware:
    """One bucket per server key, one per (browser key, client) and per client without a valid key; the
    limit is the key's. Health, metrics and CORS preflights are never limited.

    The client is the ASGI peer address: behind a proxy, run uvicorn with `--proxy-headers` and
    `--forwarded-allow-ips` set to the proxy, so that it is the browser's address and not the proxy's."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[ApiKey],
        limiter: RateLimiter,
        default: Limit | None,
        overrides: dict[str, Limit],
    ):
        self.app = app
        self.lookup = KeyLookup(keys)
        self.limiter = limiter
        self.default = default
        self.overrides = overrides

    def bucket_of(self, scope: Scope) -> tuple[str, str]:
        """(key name, bucket): the bucket is the name, with `@client` for browser keys and for requests without
        a valid key."""
        name = self.lookup.name_of(scope)
        if self.lookup.is_server(name):
            return name, name
        client = scope.get("client")
        return name, f"{name}@{client[0] if client else 'unknown'}"

    def limit_for(self, bucket: str) -> Limit | None:
        if bucket in self.overrides:
            return self.overrides[bucket]
        return None if bucket == ANONYMOUS else self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED_PATHS or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        name, bucket = self.bucket_of(scope)
        limit = self.limit_for(name)
        if limit is not None:
            wait = await self.limiter.acquire(bucket, limit)
            if wait > 0:
                RATE_LIMITED.labels(name).inc()  # key names only: the number of clients is unbounded
                retry_after = max(1, math.ceil(wait))
                await send_error(
                    send,
                    RateLimited(
                        f"rate limit of {limit.rate:g} requests/s (burst {limit.burst}) exceeded for this API key; "
                        f"retry after {retry_after} s",
                        headers={"Retry-After": str(retry_after)},
                    ),
                )
                return
        await self.app(scope, receive, send)


def make_limiter(settings: CommonSettings) -> RateLimiter:
    backend = settings.rate_limit_backend
    if backend == "redis" or (backend == "auto" and settings.redis_url):
        if not settings.redis_url:
            raise ValueError("SELARAS_RATE_LIMIT_BACKEND=redis needs REDIS_URL")
        # The check is one tiny script and fails open anyway: no request should wait long on a slow Redis for it.
        timeout_s = min(settings.redis_timeout_s, RATE_LIMIT_TIMEOUT_S)
        return RedisRateLimiter(settings.redis_url, settings.namespace, settings.redis_cluster, timeout_s)
    return MemoryRateLimiter()


def cors_origins(settings: CommonSettings) -> list[str]:
    return [origin.strip().rstrip("/") for origin in settings.cors_origins.split(",") if origin.strip()]


def install_security(app: FastAPI, settings: CommonSettings) -> None:
    """Size limit (innermost), rate limit, CORS (outermost); call before the metrics middleware is added."""
    keys = parse_keys(settings.api_keys)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        keys=keys,
        browser_max_bytes=min(settings.max_browser_request_bytes, settings.max_request_bytes),
    )
    default = Limit(settings.rate_limit_per_s, settings.rate_limit_burst) if settings.rate_limit_per_s > 0 else None
    overrides = parse_limits(settings.rate_limits)
    if default is not None or overrides:
        limiter = make_limiter(settings)
        app.add_middleware(RateLimitMiddleware, keys=keys, limiter=limiter, default=default, overrides=overrides)
    origins = cors_origins(settings)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=list(CORS_HEADERS),
            expose_headers=["retry-after"],
            allow_credentials=False,  # API keys travel in a header, never in cookies
            max_age=600,
        )


def generate_api_key(name: str, scopes: str) -> tuple[str, str]:
    """A fresh random key and its `SELARAS_API_KEYS` entry (`name:scopes:sha256`); only the hash is stored."""
    if not name or any(c in name for c in ":,= ") or len(name) > 64:
        raise ValueError("key name must be 1-64 characters without ':', ',', '=' or spaces")
    secret = "sk_" + secrets.token_urlsafe(32)
    entry = f"{name}:{scopes}:{hash_key(secret)}"
    parse_keys(entry)  # raises ValueError on unknown scopes
    return secret, entry
