"""Request-context features (hour, weekday, payday, device, channel) and Indonesian time zones.

One pure function serves the Feast on-demand feature view, training and the live ranker, so the three
cannot drift apart.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Final

# Indonesia has three zones: WIB (UTC+7), WITA (UTC+8), WIT (UTC+9).
WIB: Final = timezone(timedelta(hours=7), "WIB")
WITA: Final = timezone(timedelta(hours=8), "WITA")
WIT: Final = timezone(timedelta(hours=9), "WIT")
ZONES: Final = {"WIB": WIB, "WITA": WITA, "WIT": WIT}
CITY_ZONES: Final[dict[str, timezone]] = {
    **dict.fromkeys(
        [
            "jakarta",
            "bandung",
            "surabaya",
            "semarang",
            "medan",
            "yogyakarta",
            "palembang",
            "bekasi",
            "tangerang",
            "depok",
            "bogor",
            "malang",
            "pekanbaru",
            "padang",
            "pontianak",
            "solo",
        ],
        WIB,
    ),
    **dict.fromkeys(
        ["makassar", "denpasar", "balikpapan", "manado", "mataram", "samarinda", "banjarmasin", "kupang"],
        WITA,
    ),
    **dict.fromkeys(["jayapura", "ambon", "sorong", "merauke", "ternate"], WIT),
}
PAYDAY_FIRST_DAY: Final = 25  # Indonesian salaries land around the 25th
PAYDAY_LAST_DAY_NEXT_MONTH: Final = 3
# Codes of the categorical context columns (0 = unknown); the feature schema (services/features) lists them.
DEVICE_CODES: Final = {"mobile": 1, "desktop": 2, "tablet": 3, "app": 4}
CHANNEL_CODES: Final = {"web": 1, "app": 2, "email": 3, "push": 4, "whatsapp": 5, "social": 6, "search": 7}


def zone_for(city: str | None, utc_offset_min: int | None = None) -> timezone:
    """The visitor's zone: by city when known, else the offset the client sent, else WIB."""
    if city:
        zone = CITY_ZONES.get(city.strip().lower())
        if zone is not None:
            return zone
    if utc_offset_min is not None:
        return timezone(timedelta(minutes=utc_offset_min))
    return WIB


def local_time(ts: float, zone: timezone) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC).astimezone(zone)


def local_hour(ts: float, zone: timezone) -> int:
    """`local_time(ts, zone).hour` without building datetimes (the aggregator asks twice per event). Zones
    here are fixed offsets (`datetime.timezone`: Indonesia keeps no daylight saving time)."""
    offset = zone.utcoffset(None)
    # Whole microseconds first, as `fromtimestamp` rounds them: the hour then changes at the same instant.
    micros = round(ts * 1e6) + (offset.days * 86_400 + offset.seconds) * 1_000_000
    return micros // 3_600_000_000 % 24


def is_payday_window(day_of_month: int) -> bool:
    return day_of_month >= PAYDAY_FIRST_DAY or day_of_month <= PAYDAY_LAST_DAY_NEXT_MONTH


def context_features(
    request_ts: float,
    utc_offset_min: int | None,
    device: str | None,
    channel: str | None,
    city: str | None = None,
) -> dict[str, int]:
    """Context features for one request, in the visitor's local time."""
    moment = local_time(request_ts, zone_for(city, utc_offset_min))
    return {
        "hour": moment.hour,
        "day_of_week": moment.weekday(),
        "is_weekend": int(moment.weekday() >= 5),
        "is_payday_window": int(is_payday_window(moment.day)),
        "device_code": DEVICE_CODES.get(device or "", 0),
        "channel_code": CHANNEL_CODES.get(channel or "", 0),
    }


def daypart(hour: int) -> str:
    """Coarse part of the day, used to index "trending in context" (few values keep indexes dense)."""
    if 5 <= hour < 11:
        return "morning"
    if 11 <= hour < 15:
        return "midday"
    if 15 <= hour < 19:
        return "afternoon"
    if 19 <= hour < 23:
        return "evening"
    return "night"
