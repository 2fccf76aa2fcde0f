"""A circuit breaker for storage calls, and the guard that runs blocking storage reads off the event loop.

A stalled Redis (paused, swapping, a full network buffer) is worse than a dead one: a dead one refuses
connections at once, a stalled one holds every call until the socket timeout. `StoreGuard.run` hands the
blocking call to a small thread pool and waits at most `budget_s` for it; a call that fails or overruns counts
as a failure, and after `failures` in a row the breaker opens: calls are refused at once (StorageUnavailable,
so callers take their fallback) until `reset_s` has passed. Then one trial call goes through (half-open): its
success closes the breaker, its failure opens it again. A call left running past its budget finishes (or hits
the socket timeout) in its thread; the open breaker keeps new calls from piling up behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from prometheus_client import Counter

from services.common.errors import StorageUnavailable

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]

BREAKER_OPENED = Counter("selaras_store_breaker_opened_total", "Times the storage circuit breaker opened", ["name"])
GUARD_TIMEOUTS = Counter(
    "selaras_store_guard_timeouts_total", "Storage reads abandoned after their time budget", ["name"]
)


class CircuitBreaker:
    """Thread-safe consecutive-failure breaker. `monotonic` is injectable so tests can step time."""

    def __init__(
        self, name: str, failures: int = 3, reset_s: float = 1.0, monotonic: Callable[[], float] = time.monotonic
    ):
        if failures < 1 or reset_s <= 0:
            raise ValueError("a breaker needs failures >= 1 and reset_s > 0")
        self.name = name
        self.failures = failures
        self.reset_s = reset_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._monotonic() - self._opened_at >= self.reset_s:
                return "half_open"
            return "open"

    def allow(self) -> bool:
        """Whether a call may go to the store now. Half-open lets exactly one trial call through at a time."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._monotonic() - self._opened_at < self.reset_s or self._trial_running:
                return False
            self._trial_running = True
            return True

    def success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._opened_at = None
            self._trial_running = False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            was_open = self._opened_at is not None
            if was_open or self._consecutive >= self.failures:
                # A failed trial re-opens for a full period; a closed breaker opens at the threshold.
                self._opened_at = self._monotonic()
                if not was_open:
                    BREAKER_OPENED.labels(self.name).inc()
            self._trial_running = False

    def release(self) -> None:
        """A call ended without saying anything about the store: free the half-open trial, change nothing else."""
        with self._lock:
            self._trial_running = False


class StoreGuard:
    """Blocking storage reads for async endpoints: off the event loop, within a budget, behind a breaker."""

    def __init__(self, breaker: CircuitBreaker, budget_s: float, threads: int):
        self.breaker = breaker
        self.budget_s = budget_s
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"{breaker.name}-io")

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` in the guard's threads. Raises StorageUnavailable when the breaker is open, when `fn` raises
        (any exception: `fn` is a storage read), or when `fn` takes longer than the budget (then `fn` is
        abandoned, not interrupted)."""
        if not self.breaker.allow():
            raise StorageUnavailable(f"{self.breaker.name}: circuit open")
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn)
        try:
            result = await asyncio.wait_for(future, self.budget_s)
        except TimeoutError:
            GUARD_TIMEOUTS.labels(self.breaker.name).inc()
            self.breaker.failure()
            raise StorageUnavailable(f"{self.breaker.name}: no answer within {self.budget_s:g} s") from None
        except asyncio.CancelledError:
            self.breaker.release()  # the caller went away: that says nothing about the store
            raise
        except Exception as exc:
            # Whatever the read raised (redis-py and Feast errors are not StorageUnavailable): the store failed.
            self.breaker.failure()
            if isinstance(exc, StorageUnavailable):
                raise
            raise StorageUnavailable(f"{self.breaker.name}: {type(exc).__name__}") from exc
        self.breaker.success()
        return result

    def close(self) -> None:
        # Abandoned calls end at their socket timeout; shutdown must not wait on a stalled store.
        self.executor.shutdown(wait=False, cancel_futures=True)
