"""Business time: the one clock behind every decision that depends on "now".

Item age and "new arrival", restock watch, cooldowns, frequency caps, send-history and state TTLs, feature
windows, popularity decay, retention, experiment exposure times: all read a `Clock`, never the wall clock
directly. Production uses `SystemClock`; tests, replays and simulations set the time (`FixedClock`), start
the clock at a chosen moment (`OffsetClock`, `SELARAS_CLOCK_START`), or follow the data being replayed
(`DataClock`). A request's own `now` is honoured only where the caller may choose the time (admin keys, or
a simulation deployment): see `TimePolicy`.

Two other kinds of time are deliberately not business time and do not come from a `Clock`:
- durations (timeouts, latency, throttling): `time.perf_counter()` / `time.monotonic()`;
- infrastructure stamps that must follow the real world whatever the business clock says: TTL expiry in
  the embedded store (Redis expires keys in real time too), when an event was received (freshness lag),
  when a model or export was made. They use `wall_time()` / `wall_datetime()` below, so that a reader sees
  at the call site which of the two times is meant. A test keeps every other module off the wall clock.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime


def wall_time() -> float:
    """Real-world unix seconds, for infrastructure stamps only (see the module docstring)."""
    return time.time()


def wall_datetime() -> datetime:
    """Real-world time as an aware UTC datetime, for infrastructure stamps only."""
    return datetime.now(UTC)


def as_timestamp(moment: datetime | float) -> float:
    return moment.timestamp() if isinstance(moment, datetime) else float(moment)


class Clock(ABC):
    """Business time in unix seconds."""

    @abstractmethod
    def now(self) -> float: ...

    def observe(self, event_ts: float) -> None:  # noqa: B027  (a no-op for every clock but DataClock)
        """An event time was folded; only a clock that follows the data moves."""

    @property
    def follows_data(self) -> bool:
        """True when time only moves with the events folded (no time passes between them)."""
        return False

    def now_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now(), tz=UTC)


class SystemClock(Clock):
    """Wall time: production."""

    def now(self) -> float:
        return time.time()


class FixedClock(Clock):
    """A clock that stands still until it is set or advanced (tests, simulations)."""

    def __init__(self, at: datetime | float):
        self._at = as_timestamp(at)

    def now(self) -> float:
        return self._at

    def set(self, at: datetime | float) -> None:
        self._at = as_timestamp(at)

    def advance(self, seconds: float) -> None:
        self._at += seconds


class OffsetClock(Clock):
    """Starts at a chosen moment and runs at wall speed (a replay of history through live services)."""

    def __init__(self, start: datetime | float):
        self._offset = as_timestamp(start) - time.time()

    def now(self) -> float:
        return time.time() + self._offset


class DataClock(Clock):
    """Follows the data: "now" is the newest event time seen so far (bulk import and replays of history,
    where the wall clock would make every imported window empty and every popularity score decay to 0)."""

    def __init__(self, start: float = 0.0):
        self._at = start

    def now(self) -> float:
        return self._at

    def observe(self, event_ts: float) -> None:
        if event_ts > self._at:
            self._at = event_ts

    @property
    def follows_data(self) -> bool:
        return True


SYSTEM_CLOCK: Clock = SystemClock()


def clock_for(start: datetime | None) -> Clock:
    """The service clock: wall time, or wall speed from `start` when a replay or simulation set one."""
    return SystemClock() if start is None else OffsetClock(start)


@dataclass(frozen=True)
class ResolvedTime:
    """The time a request is answered at, and where it came from (reported in the answer)."""

    ts: float
    source: str  # "clock" | "request"
    ignored_request_time: bool = False

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {
            "now": datetime.fromtimestamp(self.ts, tz=UTC).isoformat(timespec="milliseconds"),
            "source": self.source,
        }
        if self.ignored_request_time:
            body["ignored"] = "request time needs an admin key (or a simulation deployment)"
        return body


@dataclass(frozen=True)
class TimePolicy:
    """Whether a caller may choose the time of its own request.

    A client-chosen `now` changes what is "new", what is cooling down and which window counts, and it is
    logged with the impressions, so it is honoured only for admin keys, when auth is off (development: every
    caller is an admin), or when the deployment is a simulation (`SELARAS_SIMULATION=true`)."""

    clock: Clock
    simulation: bool = False

    def resolve(self, requested: datetime | None, caller_may_set_time: bool) -> ResolvedTime:
        if requested is None:
            return ResolvedTime(self.clock.now(), "clock")
        if self.simulation or caller_may_set_time:
            return ResolvedTime(requested.timestamp(), "request")
        return ResolvedTime(self.clock.now(), "clock", ignored_request_time=True)
