"""The circuit breaker and the store guard (services/common/breaker.py): opening after consecutive failures,
one trial call when half-open, blocking calls that overrun their budget abandoned without blocking the loop,
and the Redis rate limiter on a stalled redis-server. The stalled-Redis behaviour of the whole service is
tested against a real redis-server in tests/deploy/test_faults.py."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time

import pytest

from services.common.breaker import CircuitBreaker, StoreGuard
from services.common.errors import StorageUnavailable
from services.common.ratelimit import Limit, RedisRateLimiter
from tests.conftest import RedisServer, unique_name


class SteppedClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_consecutive_failures_and_lets_one_trial_through() -> None:
    clock = SteppedClock()
    breaker = CircuitBreaker("t", failures=3, reset_s=1.0, monotonic=clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success in between: the count starts again
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.t += 0.99
    assert not breaker.allow()
    clock.t += 0.02
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # exactly one trial at a time
    breaker.failure()  # the trial failed: open for a full period again
    assert breaker.state == "open" and not breaker.allow()
    clock.t += 1.0
    assert breaker.allow()
    breaker.release()  # a trial that ended without a verdict frees the slot
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_breaker_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("t", failures=0)
    with pytest.raises(ValueError):
        CircuitBreaker("t", reset_s=0)


def test_guard_abandons_a_stalled_call_within_the_budget_and_then_fails_fast() -> None:
    stalled = threading.Event()
    guard = StoreGuard(CircuitBreaker("t", failures=2, reset_s=60), budget_s=0.05, threads=4)

    def stall() -> str:
        stalled.wait(5)
        return "late"

    async def scenario() -> tuple[list[float], float, float, str]:
        ticks: list[float] = []

        async def ticker() -> None:  # the event loop must keep running while the calls wait
            while not stalled.is_set():
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.005)

        ticking = asyncio.create_task(ticker())
        started = time.perf_counter()
        results = await asyncio.gather(*(guard.run(stall) for _ in range(2)), return_exceptions=True)
        took = time.perf_counter() - started
        assert all(isinstance(r, StorageUnavailable) for r in results)
        started = time.perf_counter()
        with pytest.raises(StorageUnavailable, match="circuit open"):
            await guard.run(lambda: "never called")
        open_took = time.perf_counter() - started
        stalled.set()
        await ticking
        return ticks, took, open_took, guard.breaker.state

    try:
        ticks, took, open_took, state = asyncio.run(scenario())
    finally:
        stalled.set()
        guard.close()
    assert took < 0.5, f"two stalled calls took {took:.3f} s"
    assert open_took < 0.01 and state == "open"
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) >= 5 and max(gaps) < 0.1, "the event loop was blocked"


def test_guard_turns_any_error_of_the_call_into_storage_unavailable_and_counts_it() -> None:
    guard = StoreGuard(CircuitBreaker("t", failures=1, reset_s=60), budget_s=1.0, threads=1)

    def broken() -> None:
        raise ConnectionResetError("reset by peer")

    async def scenario() -> str:
        with pytest.raises(StorageUnavailable, match="ConnectionResetError"):
            await guard.run(broken)
        return guard.breaker.state

    try:
        assert asyncio.run(scenario()) == "open"
    finally:
        guard.close()


def test_guard_returns_results_and_keeps_the_breaker_closed() -> None:
    guard = StoreGuard(CircuitBreaker("t"), budget_s=1.0, threads=1)
    try:
        assert asyncio.run(guard.run(lambda: 42)) == 42
        assert guard.breaker.state == "closed"
    finally:
        guard.close()


def test_rate_limiter_on_a_stalled_redis_lets_requests_through_without_waiting_each_time(
    redis_server: RedisServer,
) -> None:
    """The Redis rate limiter fails open; on a stalled Redis only the first request may wait (one socket
    timeout, no retries with backoff), the next ones pass at once until the breaker tries Redis again."""
    limiter = RedisRateLimiter(redis_server.url, unique_name("rl"), timeout_s=0.2)
    limit = Limit(rate=100.0, burst=10)
    assert redis_server.process is not None

    async def scenario() -> tuple[float, list[float], float]:
        assert await limiter.acquire("k", limit) == 0.0  # connected and the script loaded
        redis_server.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            started = time.perf_counter()
            assert await limiter.acquire("k", limit) == 0.0
            first = time.perf_counter() - started
            later = []
            for _ in range(20):
                started = time.perf_counter()
                assert await limiter.acquire("k", limit) == 0.0
                later.append(time.perf_counter() - started)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        await asyncio.sleep(1.05)  # the breaker tries Redis again: the bucket is counted again
        for _ in range(15):
            await limiter.acquire("k", limit)
        refused_wait = await limiter.acquire("k", limit)
        await limiter.close()
        return first, later, refused_wait

    first, later, refused_wait = asyncio.run(scenario())
    assert first < 0.35, f"the first request waited {first:.3f} s"
    assert max(later) < 0.01, f"later requests waited up to {max(later):.3f} s"
    assert refused_wait > 0, "the limiter did not use Redis again after the stall"
