"""A visitor's send history: the frequency caps and per-template cooldowns a decision must respect.

Stored per visitor as `{"s": [[send time, channel, template], ...], "t": {template: last send time}}`. A send
is checked against the caps and cooldowns and recorded in one step on the stored value (`try_send`, run by
`MessageRepository.record_send` as a compare-and-set), never read in one request and written in another."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import orjson

from services.messages.settings import MessageSettings
from services.messages.templates import Template

WEEK: Final = 7 * 86_400.0


@dataclass
class SendHistory:
    """A visitor's recent sends (for caps) and each template's last send (for cooldowns)."""

    sends: list[tuple[float, str, str]] = field(default_factory=list)  # (send time, channel, template)
    last: dict[str, float] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> SendHistory:
        if not raw:
            return cls()
        data = orjson.loads(raw)
        return cls([(float(s[0]), str(s[1]), str(s[2])) for s in data.get("s", [])], dict(data.get("t", {})))

    def to_bytes(self, now: float, keep_s: float) -> bytes:
        sends = [s for s in self.sends if abs(s[0] - now) < 2 * WEEK]
        last = {t: ts for t, ts in self.last.items() if now - ts < keep_s}
        return orjson.dumps({"s": sends, "t": last})

    def cap_reached(self, channel: str, send_at: datetime, settings: MessageSettings) -> str | None:
        """The first cap this send would exceed ("channel_day", ...), or None."""
        at = send_at.timestamp()
        day = send_at.date()
        zone = send_at.tzinfo
        channel_day = channel_week = total_day = total_week = 0
        for ts, sent_channel, _ in self.sends:
            if abs(ts - at) >= WEEK:
                continue
            same_day = datetime.fromtimestamp(ts, tz=zone).date() == day
            total_week += 1
            total_day += same_day
            if sent_channel == channel:
                channel_week += 1
                channel_day += same_day
        if channel_day >= settings.cap_channel_day:
            return "channel_day"
        if total_day >= settings.cap_total_day:
            return "total_day"
        if channel_week >= settings.cap_channel_week:
            return "channel_week"
        if total_week >= settings.cap_total_week:
            return "total_week"
        return None

    def cooling(self, template: Template, send_at: float) -> bool:
        last = self.last.get(template.item_id)
        return last is not None and send_at - last < template.cooldown_s

    def try_send(self, channel: str, send_at: datetime, template: Template, settings: MessageSettings) -> str | None:
        """Record the send unless a cap or the template's cooldown refuses it; the refusal ("channel_day", ...,
        "cooldown") or None. Run on the stored history inside one compare-and-set (`record_send` of the
        repository), so concurrent decisions for a visitor cannot together send more than the caps allow."""
        cap = self.cap_reached(channel, send_at, settings)
        if cap is not None:
            return cap
        if self.cooling(template, send_at.timestamp()):
            return "cooldown"
        self.record(send_at.timestamp(), channel, template.item_id)
        return None

    def replace(self, other: SendHistory) -> None:
        """Take the stored history's contents (later decisions of a batch then see every recorded send)."""
        self.sends, self.last = list(other.sends), dict(other.last)

    def record(self, send_at: float, channel: str, template_id: str) -> None:
        self.sends.append((send_at, channel, template_id))
        self.last[template_id] = max(send_at, self.last.get(template_id, -math.inf))
        self.changed = True
