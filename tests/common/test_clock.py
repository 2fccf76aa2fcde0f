"""The business clock: its kinds, who may choose a request's time, and that no module reads the wall clock
for business time."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.common.clock import DataClock, FixedClock, OffsetClock, SystemClock, TimePolicy, clock_for
from services.common.events import future_timestamp_error, not_after
from tests.factories import make_event

SERVICES = Path(__file__).resolve().parents[2] / "services"
WALL_CLOCK_READS = re.compile(r"time\.time\(\)|datetime\.now\(|\.utcnow\(|date\.today\(\)|Timestamp\.now\(")
AT = datetime(2026, 11, 20, 3, tzinfo=UTC)


def test_no_module_reads_the_wall_clock_outside_the_clock_module() -> None:
    offenders = []
    for path in sorted(SERVICES.rglob("*.py")):
        if path.name == "clock.py" and path.parent.name == "common":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if WALL_CLOCK_READS.search(line):
                offenders.append(f"{path.relative_to(SERVICES.parent)}:{number}: {line.strip()}")
    assert not offenders, "business time must come from services/common/clock.py:\n" + "\n".join(offenders)


def test_fixed_offset_data_and_system_clocks() -> None:
    fixed = FixedClock(AT)
    assert fixed.now() == AT.timestamp() and fixed.now_datetime() == AT
    fixed.advance(60)
    assert fixed.now() == AT.timestamp() + 60
    offset = OffsetClock(AT)
    assert 0 <= offset.now() - AT.timestamp() < 5  # starts there and runs at wall speed
    data = DataClock()
    for ts in (100.0, 300.0, 200.0):
        data.observe(ts)
    assert data.now() == 300.0  # follows the newest event, never goes back
    fixed.observe(1e12)  # only a data clock follows events
    assert fixed.now() == AT.timestamp() + 60
    assert abs(SystemClock().now() - time.time()) < 5
    assert isinstance(clock_for(None), SystemClock) and isinstance(clock_for(AT), OffsetClock)


def test_a_request_time_is_honoured_only_where_the_caller_may_choose_it() -> None:
    policy = TimePolicy(FixedClock(AT))
    asked = AT - timedelta(days=3)
    assert policy.resolve(None, caller_may_set_time=False).ts == AT.timestamp()
    browser = policy.resolve(asked, caller_may_set_time=False)
    assert (browser.ts, browser.source, browser.ignored_request_time) == (AT.timestamp(), "clock", True)
    assert "ignored" in browser.to_dict()
    admin = policy.resolve(asked, caller_may_set_time=True)
    assert (admin.ts, admin.source) == (asked.timestamp(), "request")
    simulation = TimePolicy(FixedClock(AT), simulation=True).resolve(asked, caller_may_set_time=False)
    assert simulation.source == "request"


def test_future_events_are_named_and_capped() -> None:
    now = AT.timestamp()
    soon = make_event(timestamp=(AT + timedelta(minutes=4)).isoformat())
    late = make_event(timestamp=datetime(2100, 1, 1, tzinfo=UTC).isoformat())
    assert future_timestamp_error(soon, now, 300) is None
    message = future_timestamp_error(late, now, 300)
    assert message is not None and "ahead of the service clock" in message
    capped = not_after(late, now + 300)
    assert capped.ts == now + 300 and capped.event_id == late.event_id
    assert not_after(soon, now + 300) is soon


@pytest.mark.parametrize("zone", [UTC, None])
def test_clock_start_needs_a_time_zone(zone: object) -> None:
    from pydantic import ValidationError

    from services.common.settings import CommonSettings

    start = datetime(2014, 6, 1, tzinfo=zone)  # type: ignore[arg-type]
    if zone is None:
        with pytest.raises(ValidationError, match="time zone"):
            CommonSettings(clock_start=start)
    else:
        assert CommonSettings(clock_start=start).clock_start == start


def test_visitor_windows_are_seen_from_the_request_time_not_the_last_event() -> None:
    from services.features.schema import visitor_row_at

    last = AT.timestamp()
    row = {"last_seen_ts": last, "views_1h": 3, "views_24h": 5, "views_7d": 9, "views_30d": 20, "event_count": 40}
    assert visitor_row_at(row, last + 60) is row  # nothing expired: the row itself
    two_days = visitor_row_at(row, last + 2 * 86_400)
    assert (two_days["views_1h"], two_days["views_24h"], two_days["views_7d"], two_days["views_30d"]) == (0, 0, 9, 20)
    month = visitor_row_at(row, last + 31 * 86_400)
    assert (month["views_7d"], month["views_30d"], month["event_count"]) == (0, 0, 40)  # totals are not windows
    assert row["views_7d"] == 9  # the stored row is not changed
    assert visitor_row_at({"views_7d": 2}, last) == {"views_7d": 2}  # no last-seen time: nothing to age from
