"""`local_hour` (the aggregator's fast path) agrees with the datetime conversion it replaces, hour boundaries
and microsecond rounding included."""

from __future__ import annotations

from datetime import UTC, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.context import WIB, WIT, WITA, local_hour, local_time

ZONES = [WIB, WITA, WIT, UTC, timezone(timedelta(minutes=-210)), timezone(timedelta(minutes=345))]


@settings(max_examples=3000, deadline=None)
@given(st.floats(min_value=-2e9, max_value=4e9, allow_nan=False), st.sampled_from(ZONES))
def test_local_hour_equals_the_hour_of_local_time(ts: float, zone: timezone) -> None:
    assert local_hour(ts, zone) == local_time(ts, zone).hour


def test_hour_boundaries_fall_where_datetime_puts_them() -> None:
    # Just before and after an hour, and fractions that round to the next microsecond (fromtimestamp rounds).
    for base in (0.0, 3600.0, 1_763_640_000.0, -3600.0):
        for delta in (-1e-6, -4e-7, -6e-7, 0.0, 4e-7, 1e-6):
            for zone in ZONES:
                assert local_hour(base + delta, zone) == local_time(base + delta, zone).hour, (base, delta, zone)
