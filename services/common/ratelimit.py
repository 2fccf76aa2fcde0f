"""Token-bucket rate limits (GCRA), shared through Redis so replicas agree, or in-process without Redis.

GCRA keeps one number per bucket, the "theoretical arrival time" (TAT): each allowed request pushes it one
emission interval (1/rate) further; a request is refused while TAT would be more than `burst` intervals ahead
of now, and the refusal says how long to wait. In Redis the check-and-update is one Lua script using the
server's clock, so every replica sees the same buckets and clock skew between replicas does not matter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from services.common.breaker import CircuitBreaker

log = logging.getLogger(__name__)

# The most a request waits on Redis for its rate-limit check (less when SELARAS_REDIS_TIMEOUT_S is lower).
RATE_LIMIT_TIMEOUT_S = 0.1


@dataclass(frozen=True)
class Limit:
    rate: float  # sustained requests per second
    burst: int  # requests allowed at once from a full bucket


def parse_limits(spec: str) -> dict[str, Limit]:
    """`name=rate/burst` entries separated by commas (`shop-web=2000/4000,crm=50/100`)."""
    limits: dict[str, Limit] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = entry.rpartition("=")
        rate, _, burst = value.partition("/")
        try:
            limit = Limit(float(rate), int(burst) if burst else max(1, int(float(rate))))
        except ValueError as exc:
            raise ValueError(f"rate limit {entry!r} must be name=rate/burst, e.g. shop-web=200/400") from exc
        if not name or limit.rate <= 0 or limit.burst < 1:
            raise ValueError(f"rate limit {entry!r} needs a name, a rate > 0 and a burst >= 1")
        limits[name] = limit
    return limits


class RateLimiter(Protocol):
    async def acquire(self, bucket: str, limit: Limit) -> float:
        """0.0 when the request may proceed, else the seconds until one would be allowed."""

    async def close(self) -> None: ...


class MemoryRateLimiter:
    """Buckets in this process (one replica, or no Redis)."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    async def acquire(self, bucket: str, limit: Limit) -> float:
        return self.acquire_at(bucket, limit, time.monotonic())

    def acquire_at(self, bucket: str, limit: Limit, now: float) -> float:
        interval = 1.0 / limit.rate
        with self._lock:
            tat = max(self._tat.get(bucket, now), now)
            new_tat = tat + interval
            allow_at = new_tat - limit.burst * interval
            if now < allow_at:
                return allow_at - now
            self._tat[bucket] = new_tat
            return 0.0

    async def close(self) -> None:
        return None


# KEYS[1] = bucket; ARGV = rate, burst. Returns the wait in seconds as a string (Lua numbers would be
# truncated to integers in the reply). TIME makes every replica use the Redis server's clock.
_GCRA_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = 1 / rate
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return tostring(allow_at - now)
end
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return '0'
"""


def _retry() -> AsyncRetry:
    """One immediate retry on a connection error (a stale pooled connection), none on timeouts: redis-py's
    default (3 retries, backoff from 1 s) held every request for seconds while Redis was stalled or down, and
    a timed-out GCRA script may still have run (a retry would take two tokens)."""
    return AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


class RedisRateLimiter:
    """Buckets in Redis under `<namespace>:ratelimit:<bucket>`. Fails open: a Redis outage must not turn
    into an API outage (the services already degrade without Redis), so requests pass and a warning is logged."""

    def __init__(self, url: str, namespace: str, cluster: bool = False, timeout_s: float = 0.5):
        self.url = url
        self.namespace = namespace
        self.cluster = cluster
        self.timeout_s = timeout_s
        # redis.asyncio connections belong to the event loop that opened them; test clients and uvicorn
        # reloads run several loops, so each loop gets its own client.
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, Any, Any]] = {}
        self._last_warning = 0.0
        # A stalled Redis would add the socket timeout to every request: after one failure, requests pass
        # without asking Redis for a second, then one request tries again.
        self._breaker = CircuitBreaker("ratelimit", failures=1, reset_s=1.0)

    def _client(self) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            client: Any
            if self.cluster:
                client = AsyncRedisCluster.from_url(
                    self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s, retry=_retry()
                )
            else:
                client = AsyncRedis.from_url(
                    self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s, retry=_retry()
                )
            entry = (loop, client, client.register_script(_GCRA_SCRIPT))
            self._clients[id(loop)] = entry
        return entry[1], entry[2]

    async def acquire(self, bucket: str, limit: Limit) -> float:
        if not self._breaker.allow():
            return 0.0
        _, script = self._client()
        try:
            wait = await script(keys=[f"{self.namespace}:ratelimit:{bucket}"], args=[limit.rate, limit.burst])
        except asyncio.CancelledError:
            self._breaker.release()
            raise
        except (RedisError, OSError) as exc:
            self._breaker.failure()
            now = time.monotonic()
            if now - self._last_warning > 30:
                self._last_warning = now
                log.warning("rate limiter unavailable, letting requests through: %s", type(exc).__name__)
            return 0.0
        self._breaker.success()
        return float(wait.decode() if isinstance(wait, bytes) else wait)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        entry = self._clients.pop(id(loop), None)
        if entry is not None:
            await entry[1].aclose()
