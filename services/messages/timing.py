"""Send time: quiet hours in the visitor's local time and the hour a message should go out today."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from services.common.context import local_time
from services.messages.settings import MessageSettings


def quiet_hour(hour: int, settings: MessageSettings) -> bool:
    if not settings.respect_quiet_hours:
        return False
    start, end = settings.quiet_start_hour, settings.quiet_end_hour
    if start == end:
        return False
    if start > end:
        return hour >= start or hour < end
    return start <= hour < end


def open_hours(settings: MessageSettings) -> tuple[bool, ...]:
    """For each local hour 0..23: may a message be sent then?"""
    return tuple(not quiet_hour(h, settings) for h in range(24))


def plan_send(
    now: float, zone: timezone, histogram: Sequence[float], settings: MessageSettings, allowed: Sequence[bool] = ()
) -> datetime | None:
    """When to send today: the visitor's most active hour that is still ahead and outside quiet hours
    (now, if that hour is the current one). None when today has no such hour left."""
    local = local_time(now, zone)
    allowed = allowed or open_hours(settings)
    hours = [h for h in range(local.hour, 24) if allowed[h]]
    if not hours:
        return None
    if len(histogram) == 24 and max(histogram) > 0:
        best = max(hours, key=lambda h: (histogram[h], -h))
    else:
        best = settings.default_send_hour if settings.default_send_hour in hours else hours[0]
    if best == local.hour:
        return local
    return local.replace(hour=best, minute=0, second=0, microsecond=0)
