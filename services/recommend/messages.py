"""Next-best message: eligibility per trigger, send time, caps and cooldowns, tone, rendering and the policy.

One decision per (visitor, channel): consent -> experiment -> send slot (quiet hours) -> frequency caps ->
eligible messages (trigger rules on the visitor's features) -> cooldowns -> the uplift model (one vectorised
predict for a whole batch) -> control group / exploration -> render in the visitor's locale and tone.

Recording: the answer is the send. Unless the request says `dry_run`, Selaras records the send in the
visitor's send history (caps and cooldowns) before answering, and logs the decision as a `message_sent`
event (event id `msg:<recommendation_id>`, so a CRM that posts the same event again is deduplicated) with its
propensity and candidates. Decisions that send nothing on purpose (control group, no expected uplift,
exploration) are logged too, as `message_sent` with `item_id` "none" and `properties.action` "none": they
are the comparison that uplift training and offline evaluation need; no message goes out for them.
Caps are checked against the recorded history, including earlier decisions of the same batch. Two
concurrent requests for the same visitor are not serialised (no cross-request lock): a CRM asks once per
visitor and channel at a time, and a batch with repeated visitors is handled in order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timezone
from typing import Any, Final, Literal

import numpy as np
import orjson
from prometheus_client import Counter, Histogram
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.catalog import CatalogItem, ItemKind, Targeting
from services.common.clock import SYSTEM_CLOCK, Clock, TimePolicy
from services.common.consent import ConsentDefaults
from services.common.context import is_payday_window, local_time
from services.common.events import Event, EventContext, EventType, Identifier
from services.common.features import as_number
from services.recommend.assignment import HOLDOUT_ARM
from services.recommend.catalog_cache import ItemSnapshot
from services.recommend.message_model import (
    ACTION_COLUMNS,
    NONE_ACTION,
    TRIGGERS,
    VISITOR_COLUMNS,
    IncompatibleMessageModel,
    MessageModel,
    VisitorView,
    action_vector,
    encode_candidates,
    visitor_vector,
)
from services.recommend.message_repository import MessageRepository

log = logging.getLogger(__name__)

Channel = Literal["push", "email", "whatsapp"]
CHANNELS: Final = ("push", "email", "whatsapp")
PURPOSE: Final = {channel: f"marketing_{channel}" for channel in CHANNELS}
TONES: Final = ("short", "detailed")
WEEK: Final = 7 * 86_400.0
# The rules baseline (experiment arms that are not personalized): the most time-sensitive trigger first.
RULE_PRIORITY: Final = {
    trigger: rank
    for rank, trigger in enumerate(
        (
            "cart_abandonment",
            "back_in_stock",
            "price_drop",
            "payday_promo",
            "new_arrivals",
            "loyalty_reward",
            "win_back",
        )
    )
}

DECISIONS = Counter(
    "selaras_nbm_decisions_total",
    "Next-best-message answers by channel, action and reason",
    ["channel", "action", "reason"],
)
SENDS = Counter("selaras_nbm_sends_total", "Messages chosen to be sent, by channel and trigger", ["channel", "trigger"])
BATCH_SECONDS = Histogram(
    "selaras_nbm_decide_seconds",
    "Time to decide one request or batch",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DECISIONS_DROPPED = Counter("selaras_nbm_log_dropped_total", "Decision log entries dropped (queue full)")


class MessageSettings(BaseSettings):
    """Message policy settings (env prefix RECOMMEND_MESSAGES_)."""

    model_config = SettingsConfigDict(env_prefix="RECOMMEND_MESSAGES_", extra="ignore")

    # Quiet hours in the visitor's local time: [start, end) wraps around midnight when start > end.
    quiet_start_hour: int = Field(default=21, ge=0, le=23)
    quiet_end_hour: int = Field(default=8, ge=0, le=23)
    respect_quiet_hours: bool = True
    default_send_hour: int = Field(default=19, ge=0, le=23)  # when the visitor's active hours are unknown
    # Frequency caps: per channel and across channels, per local calendar day and per rolling 7 days.
    cap_channel_day: int = Field(default=1, ge=0)
    cap_channel_week: int = Field(default=3, ge=0)
    cap_total_day: int = Field(default=2, ge=0)
    cap_total_week: int = Field(default=5, ge=0)
    # Trigger rules.
    cart_min_age_h: float = Field(default=1.0, ge=0)
    cart_max_age_days: float = Field(default=14.0, gt=0)
    min_discount: float = Field(default=0.1, ge=0, le=1)
    restock_days: float = Field(default=7.0, gt=0)
    new_arrival_days: float = Field(default=14.0, gt=0)
    win_back_after_days: float = Field(default=30.0, gt=0)
    loyal_min_orders: int = Field(default=3, ge=1)
    voucher_discount: float = Field(default=0.1, ge=0, le=1)  # {discount} of messages without a product
    # Policy: random control group (sent nothing), exploration, and the uplift a send must beat.
    control_rate: float = Field(default=0.05, ge=0, le=1)
    exploration: float = Field(default=0.1, ge=0, le=1)
    cold_start_exploration: float = Field(default=1.0, ge=0, le=1)  # without a model: uniform over actions
    min_uplift: float = Field(default=0.001, ge=0)  # P(purchase) points a send must add to be worth its fatigue
    max_batch: int = Field(default=1000, ge=1, le=10_000)
    model_check_interval_s: float = Field(default=30.0, gt=0)
    salt: str = "nbm"


class MessageRequest(BaseModel):
    """Which message to send this visitor on this channel (and when)."""

    model_config = ConfigDict(extra="forbid")

    visitor_id: Identifier
    channel: Channel
    # The decision time; defaults to the service clock. Honoured only for admin keys or in a simulation
    # deployment (SELARAS_SIMULATION); the answer's `time` says which time was used.
    now: AwareDatetime | None = None
    # Preview only: nothing is recorded (caps, cooldowns, decision log).
    dry_run: bool = False
    # Also answer every eligible message with its expected uplift (debugging, CRM previews).
    explain: bool = False


class MessageBatchRequest(BaseModel):
    """Up to `max_batch` decisions in one call (push systems planning sends)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[MessageRequest] = Field(min_length=1, max_length=10_000)


# ------------------------------------------------------------------------------------------------
# Templates and the product lookups the triggers need (built once per item-cache snapshot)
# ------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True, slots=True)
class Template:
    row: int
    item_id: str
    name: str
    trigger: str
    channels: frozenset[str]
    texts: Mapping[str, Mapping[str, Mapping[str, str]]]
    deep_link: str
    cooldown_s: float
    needs_product: bool
    targeted: bool  # any targeting rule set
    item: CatalogItem


def _mentions(item: CatalogItem, *tokens: str) -> bool:
    assert item.message is not None
    texts = [item.message.deep_link] + [
        text for tones in item.message.texts.values() for parts in tones.values() for text in parts.values()
    ]
    return any(f"{{{token}}}" in text for text in texts for token in tokens)


@dataclass
class MessageCatalog:
    """Message templates by channel and per-category product lists, for one snapshot."""

    snapshot: ItemSnapshot
    templates: list[Template]
    by_channel: dict[str, list[Template]]
    discounted_by_category: dict[str, np.ndarray]  # available, discount >= min, most discounted first
    discounted: np.ndarray
    new_by_category: dict[str, np.ndarray]  # newest first
    max_cooldown_s: float
    # Python lookups: numpy scalar access costs ~100 ns a read, and eligibility reads a lot per visitor.
    usable: dict[str, int] = field(default_factory=dict)  # available products: id -> row
    discount: list[float] = field(default_factory=list)
    created: list[float] = field(default_factory=list)
    price: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, snapshot: ItemSnapshot, min_discount: float) -> MessageCatalog:
        templates: list[Template] = []
        for row, item in snapshot.objects.items():
            if item.kind is not ItemKind.MESSAGE or item.message is None or not snapshot.available[row]:
                continue
            message = item.message
            templates.append(
                Template(
                    row=row,
                    item_id=item.item_id,
                    name=item.title,
                    trigger=message.trigger,
                    channels=frozenset(message.channels),
                    texts=message.texts,
                    deep_link=message.deep_link,
                    cooldown_s=message.cooldown_hours * 3600.0,
                    needs_product=_mentions(item, "product", "price", "item_id"),
                    targeted=item.targeting != Targeting(),
                    item=item,
                )
            )
        templates.sort(key=lambda t: t.item_id)
        by_channel = {channel: [t for t in templates if channel in t.channels] for channel in CHANNELS}
        products = snapshot.popular  # available products, most popular first
        discount = snapshot.discount[products] if len(products) else np.zeros(0)
        discounted = products[discount >= max(min_discount, 1e-9)]
        discounted = discounted[np.argsort(-snapshot.discount[discounted], kind="stable")]
        by_category: dict[str, list[int]] = {}
        for i in discounted:
            category = snapshot.categories[i]
            if category:
                by_category.setdefault(category, []).append(int(i))
        # Every available product, newest first: what counts as new depends on the decision time (a replay or
        # an admin's `now`), so the trigger applies the cut-off, not the snapshot.
        newest = products[np.argsort(-snapshot.created_ts[products], kind="stable")]
        new_by: dict[str, list[int]] = {}
        for i in newest:
            category = snapshot.categories[i]
            if category:
                new_by.setdefault(category, []).append(int(i))
        return cls(
            snapshot=snapshot,
            templates=templates,
            by_channel=by_channel,
            discounted_by_category={c: np.array(v, dtype=np.int64) for c, v in by_category.items()},
            discounted=discounted.astype(np.int64),
            new_by_category={c: np.array(v, dtype=np.int64) for c, v in new_by.items()},
            max_cooldown_s=max((t.cooldown_s for t in templates), default=0.0),
            usable={snapshot.ids[i]: int(i) for i in products},
            discount=snapshot.discount.tolist(),
            created=snapshot.created_ts.tolist(),
            price=snapshot.price.tolist(),
        )


class StockWatch:
    """Remembers which products were sold out, so that a product coming back is "back in stock".

    Each item-cache refresh is compared with the previous one; the state is kept in the store so that a
    restart (or another worker) still knows what was sold out before."""

    def __init__(self, repository: MessageRepository | None):
        self.repository = repository
        self.sold_out: set[str] | None = None
        self.restocked: dict[str, float] = {}
        self._snapshot_id = -1
        self._lock = threading.Lock()

    def observe(self, snapshot: ItemSnapshot, now: float, keep_s: float) -> None:
        if id(snapshot) == self._snapshot_id:
            return
        with self._lock:
            if id(snapshot) == self._snapshot_id:
                return
            if self.sold_out is None:
                self._load()
            is_product = snapshot.kind == 0
            stock_known = snapshot.stock >= 0
            sold_out = {snapshot.ids[i] for i in np.flatnonzero(is_product & stock_known & (snapshot.stock == 0))}
            previous = self.sold_out or set()
            changed = False
            for item_id in previous - sold_out:
                row = snapshot.index.get(item_id)
                if row is not None and snapshot.available[row]:
                    self.restocked[item_id] = now
                    changed = True
            for item_id in [i for i, ts in self.restocked.items() if now - ts > keep_s]:
                del self.restocked[item_id]
                changed = True
            changed = changed or sold_out != previous
            self.sold_out = sold_out
            self._snapshot_id = id(snapshot)
            if changed and self.repository is not None:
                try:
                    blob = orjson.dumps({"sold_out": sorted(sold_out), "restocked": self.restocked})
                    self.repository.save_stock_watch(blob)
                except Exception as exc:  # the watch is best effort; decisions go on without it
                    log.warning("stock watch not saved: %s", type(exc).__name__)

    def _load(self) -> None:
        self.sold_out = set()
        if self.repository is None:
            return
        try:
            raw = self.repository.stock_watch()
        except Exception as exc:
            log.warning("stock watch not loaded: %s", type(exc).__name__)
            return
        if raw:
            data = orjson.loads(raw)
            self.sold_out = set(data.get("sold_out", []))
            self.restocked = {str(k): float(v) for k, v in data.get("restocked", {}).items()}


# ------------------------------------------------------------------------------------------------
# Send time, caps and cooldowns
# ------------------------------------------------------------------------------------------------


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

    def record(self, send_at: float, channel: str, template_id: str) -> None:
        self.sends.append((send_at, channel, template_id))
        self.last[template_id] = max(send_at, self.last.get(template_id, -math.inf))
        self.changed = True


# ------------------------------------------------------------------------------------------------
# Eligibility: trigger rules on the visitor's features
# ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    template: Template
    product: int  # snapshot row, -1 = no product
    reason: str


def _age(hours: float) -> str:
    return f"{hours:.0f} hours" if hours < 48 else f"{hours / 24:.0f} days"


class Eligibility:
    """Which templates a visitor qualifies for on a channel, each with the product it is about."""

    def __init__(self, catalog: MessageCatalog, watch: StockWatch, settings: MessageSettings):
        self.catalog = catalog
        self.snapshot = catalog.snapshot
        self.restocked = watch.restocked
        self.settings = settings

    def candidates(self, view: VisitorView, channel: str, now: float, send_at: datetime) -> list[Candidate]:
        found: list[Candidate] = []
        memo: dict[str, tuple[int, str] | None] = {}
        for template in self.catalog.by_channel.get(channel, ()):
            trigger = template.trigger
            if trigger not in memo:
                memo[trigger] = self._trigger(trigger, view, now, send_at, template.needs_product)
            hit = memo[trigger]
            if hit is None:
                continue
            product, reason = hit
            if template.needs_product and product < 0:
                product = self._fallback_product(view)
                if product < 0:
                    continue
            if not self._targeted(template, view, product, send_at):
                continue
            found.append(Candidate(template, product if template.needs_product else -1, reason))
        return found

    def _usable(self, item_id: str, view: VisitorView) -> int:
        """The product's row when it can be offered (active, in stock, not bought yet), else -1."""
        row = self.catalog.usable.get(item_id, -1)
        return -1 if row < 0 or item_id in view.purchased else row

    def _trigger(
        self, trigger: str, view: VisitorView, now: float, send_at: datetime, wants_product: bool
    ) -> tuple[int, str] | None:
        s = self.settings
        days_away = (now - view.last_seen) / 86_400.0 if view.last_seen == view.last_seen else math.inf
        if trigger == "cart_abandonment":
            if not view.cart or view.cart_updated != view.cart_updated:
                return None
            hours = (now - view.cart_updated) / 3600.0
            if hours < s.cart_min_age_h or hours > s.cart_max_age_days * 24:
                return None
            for item_id in view.cart:
                row = self._usable(item_id, view)
                if row >= 0:
                    count = len(view.cart)
                    return row, f"cart with {count} item{'s' * (count > 1)} left {_age(hours)} ago"
            return None
        if trigger == "price_drop":
            best, best_discount = -1, s.min_discount - 1e-9
            discounts = self.catalog.discount
            for item_id in view.recent:
                row = self._usable(item_id, view)
                if row >= 0 and discounts[row] > best_discount:
                    best, best_discount = row, discounts[row]
            if best < 0 or best_discount <= 0:
                return None
            return best, f"{self.snapshot.titles[best]}, which they viewed, is {round(best_discount * 100)}% off"
        if trigger == "back_in_stock":
            cutoff = now - s.restock_days * 86_400.0
            for item_id in view.recent:
                restocked = self.restocked.get(item_id)
                if restocked is not None and cutoff <= restocked <= now:
                    row = self._usable(item_id, view)
                    if row >= 0:
                        return row, f"{self.snapshot.titles[row]}, which they viewed, is back in stock"
            return None
        if trigger == "new_arrivals":
            cutoff = now - s.new_arrival_days * 86_400.0
            for category in view.categories[:3]:
                for row in self.catalog.new_by_category.get(category, ()):
                    created = self.catalog.created[row]
                    if created < cutoff:
                        break  # newest first: the rest are older still
                    item_id = self.snapshot.ids[row]
                    if created <= now and item_id not in view.recent and item_id not in view.purchased:
                        return int(row), f"new in {category}, one of their favourite categories"
            return None
        if trigger == "win_back":
            if days_away < s.win_back_after_days or not math.isfinite(days_away):
                return None
            product = self._discounted_product(view) if wants_product else -1
            return product, f"last visit {days_away:.0f} days ago"
        if trigger == "loyalty_reward":
            if view.orders < s.loyal_min_orders or days_away >= s.win_back_after_days:
                return None
            product = self._discounted_product(view) if wants_product else -1
            return product, f"{view.orders} orders: a loyal customer"
        if trigger == "payday_promo":
            if not is_payday_window(send_at.day):
                return None
            product = self._discounted_product(view) if wants_product else -1
            return product, "payday window in their time zone"
        return None

    def _discounted_product(self, view: VisitorView) -> int:
        """The most discounted available product in the visitor's favourite categories, not yet bought."""
        for category in view.categories[:3]:
            for row in self.catalog.discounted_by_category.get(category, ())[:20]:
                if self.snapshot.ids[row] not in view.purchased:
                    return int(row)
        return -1

    def _fallback_product(self, view: VisitorView) -> int:
        product = self._discounted_product(view)
        if product >= 0:
            return product
        for row in self.catalog.discounted[:20]:
            if self.snapshot.ids[row] not in view.purchased:
                return int(row)
        return -1

    def _targeted(self, template: Template, view: VisitorView, product: int, send_at: datetime) -> bool:
        if not template.targeted:
            return True
        targeting = template.item.targeting
        if targeting.payday_only and not is_payday_window(send_at.day):
            return False
        city = str(view.row.get("city") or "").lower()
        if targeting.cities and city not in {c.lower() for c in targeting.cities}:
            return False
        if targeting.categories:
            category = self.snapshot.categories[product] if product >= 0 else None
            if category not in targeting.categories and not set(view.categories[:3]) & set(targeting.categories):
                return False
        return not (targeting.hours and send_at.hour not in targeting.hours)


# ------------------------------------------------------------------------------------------------
# Tone and rendering
# ------------------------------------------------------------------------------------------------

# Persona traits (services/profile/personas.py) that call for a detailed, reassuring message, or a short one.
DETAILED_SIGNS: Final = {("session_depth", 1), ("views_30d", 1), ("purchase_rate", -1), ("cart_rate", -1)}
SHORT_SIGNS: Final = {
    ("session_depth", -1),
    ("purchase_rate", 1),
    ("discount_affinity", 1),
    ("discount_view_share", 1),
    ("cart_rate", 1),
}
DETAILED_NAMES: Final = ("researcher", "careful")
SHORT_NAMES: Final = ("quick", "deal hunter", "bargain")


def tone_for(view: VisitorView, persona: Mapping[str, Any] | None) -> tuple[str, str]:
    """(tone, why): from the persona's traits when personas exist, else from browsing behaviour."""
    if persona:
        name = str(persona.get("name_en") or "").lower()
        detailed = short = 0.0
        for trait in persona.get("top_traits") or ():
            if not isinstance(trait, Mapping):
                continue
            direction = 1 if as_number(trait.get("value")) > as_number(trait.get("population_mean")) else -1
            key = (str(trait.get("trait")), direction)
            detailed += key in DETAILED_SIGNS
            short += key in SHORT_SIGNS
        detailed += 2 * any(word in name for word in DETAILED_NAMES)
        short += 2 * any(word in name for word in SHORT_NAMES)
        if detailed != short:
            label = persona.get("name_en") or f"persona {persona.get('persona_id')}"
            return ("detailed" if detailed > short else "short"), f"persona {label}"
    depth = view.value("session_depth")
    views = view.value("views_30d")
    per_order = views / max(view.orders, 1) if views == views else math.nan
    # Careful researchers browse deep sessions and view many products per order.
    if (depth == depth and depth >= 12) or (per_order == per_order and views >= 20 and per_order >= 40):
        return "detailed", "browses many products before buying"
    return "short", "decides quickly"


def format_price(price: float, locale: str) -> str:
    whole = f"{round(price):,}"
    return f"Rp{whole.replace(',', '.')}" if locale == "id" else f"Rp{whole}"


FALLBACK_NAME: Final = {"id": "Kak", "en": "friend"}


def fill(text: str, tokens: Mapping[str, str]) -> str:
    """Replace {token}s (unknown tokens become empty: a half-filled sentence beats a literal brace)."""
    return _TOKEN.sub(lambda m: tokens.get(m.group(1), ""), text)


def render(template: Template, locale: str, tone: str, tokens: Mapping[str, str]) -> tuple[str, str, str, str]:
    """(title, body, locale, tone) actually used: falls back to Indonesian, then any locale/tone present."""
    texts = template.texts
    used_locale = locale if locale in texts else ("id" if "id" in texts else next(iter(texts)))
    tones = texts[used_locale]
    used_tone = tone if tone in tones else ("short" if "short" in tones else next(iter(tones)))
    parts = tones[used_tone]
    title, body = fill(parts.get("title", ""), tokens).strip(), fill(parts.get("body", ""), tokens).strip()
    return title[:1].upper() + title[1:], body[:1].upper() + body[1:], used_locale, used_tone


# ------------------------------------------------------------------------------------------------
# The service
# ------------------------------------------------------------------------------------------------


class _Ids:
    """Recommendation ids: a random 64-bit prefix per process plus a counter (uuid4 per decision costs a syscall)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prefix = uuid.uuid4().hex[:16]
        self._count = 0

    def __call__(self) -> str:
        with self._lock:
            self._count += 1
            if self._count >= 1 << 60:
                self._prefix, self._count = uuid.uuid4().hex[:16], 1
            return f"{self._prefix}{self._count:016x}"


next_id = _Ids()


def _uniforms(salt: str, visitor_id: str, channel: str, day: str) -> tuple[float, float]:
    """Two reproducible uniforms per (visitor, channel, local day): asking again the same day answers the same."""
    digest = hashlib.blake2b(f"{salt}\x1f{visitor_id}\x1f{channel}\x1f{day}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:], "big") / 2**64


@dataclass
class _Planned:
    index: int
    request: MessageRequest
    view: VisitorView
    now: float
    send_at: datetime
    send_ts: float
    candidates: list[Candidate]
    history: SendHistory
    experiment: tuple[str, str] | None
    personalized: bool = True  # False: the experiment arm gets the rules baseline, not the uplift model
    first: int = 0  # first candidate row in the batch matrices
    row: int = 0  # row of the decision in the batch's visitor matrix


class MessageService:
    """Decides next-best messages for one visitor or a batch, on the recommend service's item snapshot."""

    def __init__(
        self,
        repository: MessageRepository,
        snapshot_source: Callable[[], ItemSnapshot],
        settings: MessageSettings | None = None,
        consent_defaults: ConsentDefaults | None = None,
        experiments: Any = None,
        recommendation_ttl_s: int = 7 * 86_400,
        clock: Clock = SYSTEM_CLOCK,
        simulation: bool = False,
    ):
        self.repository = repository
        self.clock = clock
        self.time_policy = TimePolicy(clock, simulation)
        self.snapshot_source = snapshot_source
        self.settings = settings or MessageSettings()
        self.consent_defaults = consent_defaults or ConsentDefaults()
        self.experiments = experiments
        self.recommendation_ttl_s = recommendation_ttl_s
        self.watch = StockWatch(repository)
        self._catalog: MessageCatalog | None = None
        self._model: MessageModel | None = None
        self._model_checked = -math.inf
        self._personas: dict[int, dict[str, Any]] = {}
        self._personas_checked = -math.inf
        self._lock = threading.Lock()

    # -- cached inputs --------------------------------------------------------------------------------
    def catalog(self, now: float) -> MessageCatalog:
        """The message catalog of the current item snapshot; `now` stamps restocks the watch notices."""
        snapshot = self.snapshot_source()
        catalog = self._catalog
        if catalog is None or catalog.snapshot is not snapshot:
            catalog = MessageCatalog.build(snapshot, self.settings.min_discount)
            self._catalog = catalog
        self.watch.observe(snapshot, now, self.settings.restock_days * 86_400.0)
        return catalog

    @property
    def model(self) -> MessageModel | None:
        """The newest message model, re-checked every `model_check_interval_s` (one small read)."""
        now = time.monotonic()
        if now - self._model_checked >= self.settings.model_check_interval_s:
            with self._lock:
                if now - self._model_checked >= self.settings.model_check_interval_s:
                    self._model_checked = now
                    self._reload_model()
        return self._model

    def _reload_model(self) -> None:
        try:
            version = self.repository.latest_model_version()
            if version is None or (self._model is not None and self._model.version == version):
                return
            blob = self.repository.model_blob(version)
            if blob is not None:
                self._model = MessageModel.from_bytes(blob)
                log.info("message model %s loaded", version)
        except IncompatibleMessageModel as exc:
            log.warning("message model skipped: %s", exc)
        except Exception as exc:  # keep the current model when the store hiccups
            log.warning("message model not reloaded: %s", type(exc).__name__)

    def use_model(self, model: MessageModel | None) -> None:
        """Serve this model (tests, simulations); the store is still checked for newer ones later."""
        self._model = model
        self._model_checked = time.monotonic()

    def personas(self) -> dict[int, dict[str, Any]]:
        now = time.monotonic()
        if now - self._personas_checked >= 60.0:
            self._personas_checked = now
            try:
                self._personas = self.repository.persona_profiles()
            except Exception as exc:
                log.warning("personas not loaded: %s", type(exc).__name__)
        return self._personas

    # -- deciding ------------------------------------------------------------------------------------
    def decide(self, request: MessageRequest, caller_may_set_time: bool = True) -> dict[str, Any]:
        """One decision. `caller_may_set_time`: whether the request's `now` is honoured (the HTTP endpoints pass
        False for non-admin keys; see `TimePolicy`); the answer says which time was used."""
        started = time.perf_counter()
        result = self._decide([request], caller_may_set_time)[0]
        BATCH_SECONDS.labels("single").observe(time.perf_counter() - started)
        return result

    def decide_batch(
        self, requests: Sequence[MessageRequest], caller_may_set_time: bool = True
    ) -> list[dict[str, Any]]:
        started = time.perf_counter()
        results = self._decide(requests, caller_may_set_time)
        BATCH_SECONDS.labels("batch").observe(time.perf_counter() - started)
        return results

    def _decide(self, requests: Sequence[MessageRequest], caller_may_set_time: bool) -> list[dict[str, Any]]:
        settings = self.settings
        times = [self.time_policy.resolve(r.now, caller_may_set_time) for r in requests]
        # A restock is noticed "now"; for replays and simulations that is the earliest decision time asked.
        catalog = self.catalog(min(t.ts for t in times))
        eligibility = Eligibility(catalog, self.watch, settings)
        model = self.model
        personas = self.personas()
        visitor_ids = list(dict.fromkeys(r.visitor_id for r in requests))
        consents = dict(zip(visitor_ids, self.repository.consents(visitor_ids), strict=True))
        # Consent first (one cheap read): features and send histories only for visitors who may be messaged.
        consented = [
            r.visitor_id for r in requests if consents[r.visitor_id].allows(PURPOSE[r.channel], self.consent_defaults)
        ]
        reachable = list(dict.fromkeys(consented))
        rows = self.repository.visitor_rows(reachable)
        histories = {
            v: SendHistory.from_bytes(raw)
            for v, raw in zip(reachable, self.repository.histories(reachable), strict=True)
        }
        views = {v: VisitorView.from_row(v, row) for v, row in zip(reachable, rows, strict=True)}

        allowed_hours = open_hours(settings)
        results: list[dict[str, Any] | None] = [None] * len(requests)
        planned: list[_Planned] = []
        for i, request in enumerate(requests):
            now = times[i].ts
            channel = request.channel
            if not consents[request.visitor_id].allows(PURPOSE[channel], self.consent_defaults):
                results[i] = self._none(request, "no_consent", f"no consent for {PURPOSE[channel]}")
                continue
            view = views[request.visitor_id]
            experiment = self._experiment(request, now)
            if experiment is not None and experiment[1] == HOLDOUT_ARM:
                detail = "the experiments' global holdout gets no marketing messages"
                results[i] = self._none(request, "experiment_holdout", detail, experiment)
                continue
            tag = (experiment[0], experiment[1]) if experiment else None
            personalized = experiment[2] if experiment else True
            if not view.known:
                results[i] = self._none(request, "unknown_visitor", "no behaviour recorded for this visitor", tag)
                continue
            send_at = plan_send(now, view.zone, view.histogram, settings, allowed_hours)
            if send_at is None:
                results[i] = self._none(
                    request, "quiet_hours", "quiet hours until tomorrow in the visitor's time zone", tag
                )
                continue
            history = histories[request.visitor_id]
            cap = history.cap_reached(channel, send_at, settings)
            if cap is not None:
                results[i] = self._none(request, "frequency_cap", f"{cap} cap reached", tag)
                continue
            candidates = eligibility.candidates(view, channel, now, send_at)
            if not candidates:
                results[i] = self._none(request, "no_eligible_message", "no trigger applies to this visitor now", tag)
                continue
            send_ts = send_at.timestamp()
            candidates = [c for c in candidates if not history.cooling(c.template, send_ts)]
            if not candidates:
                results[i] = self._none(request, "cooldown", "every eligible message is cooling down", tag)
                continue
            planned.append(_Planned(i, request, view, now, send_at, send_ts, candidates, history, tag, personalized))

        if planned:
            uplift, attributed, baseline = self._score(planned, catalog.snapshot, model)
            traits = self._traits_for(planned)
            for p in planned:
                results[p.index] = self._choose(p, uplift, attributed, baseline, model, catalog, traits, personas)

        writes = {
            visitor_id: history.to_bytes(max(t.ts for t in times), catalog.max_cooldown_s + WEEK)
            for visitor_id, history in histories.items()
            if history.changed
        }
        if writes:
            self.repository.save_histories(writes, int(max(catalog.max_cooldown_s, WEEK) + 86_400))
        for result, used in zip(results, times, strict=True):
            if result is not None:
                result["time"] = used.to_dict()
        out = [r for r in results if r is not None]
        for result in out:
            DECISIONS.labels(result["channel"], result["action"], result.get("reason") or "send").inc()
        return out

    def _experiment(self, request: MessageRequest, now: float) -> tuple[str, str, bool] | None:
        """(experiment key, arm, personalized) covering this decision, when the experiments runtime assigns
        messages. The holdout arm gets nothing; a non-personalized arm gets the rules baseline."""
        assign = getattr(self.experiments, "assign_message", None)
        if assign is None:
            return None
        try:
            assigned = assign(request.visitor_id, request.channel, now)
        except Exception as exc:  # experiments must never take messages down
            log.warning("message experiment assignment failed: %s", type(exc).__name__)
            return None
        if not assigned:
            return None
        key, arm = str(assigned[0]), str(assigned[1])
        allowed = bool(assigned[2]) if len(assigned) > 2 else True
        return key, arm, allowed

    def _score(
        self, planned: Sequence[_Planned], snapshot: ItemSnapshot, model: MessageModel | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One model call for the whole batch: uplift and P(message-driven purchase) per candidate row."""
        total = 0
        for k, p in enumerate(planned):
            p.first, p.row = total, k
            total += len(p.candidates)
        if model is None:
            return np.zeros(total), np.zeros(total), np.zeros(len(planned))
        V = np.empty((len(planned), len(VISITOR_COLUMNS)), dtype=np.float64)
        A = np.empty((total, len(ACTION_COLUMNS)), dtype=np.float64)
        owner = np.empty(total, dtype=np.int64)
        for k, p in enumerate(planned):
            V[k] = visitor_vector(p.view, p.now, p.send_ts, p.request.channel)
            for j, c in enumerate(p.candidates):
                A[p.first + j] = action_vector(
                    p.view, c.template.trigger, c.template.item_id, c.product, snapshot, p.now
                )
                owner[p.first + j] = k
        uplift, attributed, baseline = model.uplift(V, A, owner)
        return uplift, attributed, baseline

    def _traits_for(self, planned: Sequence[_Planned]) -> dict[str, dict[str, Any]]:
        visitor_ids = list(dict.fromkeys(p.request.visitor_id for p in planned))
        try:
            return dict(zip(visitor_ids, self.repository.visitor_traits(visitor_ids), strict=True))
        except Exception as exc:  # names are a nicety: render with the fallback greeting
            log.warning("visitor traits unavailable: %s", type(exc).__name__)
            return {}

    def _choose(
        self,
        p: _Planned,
        uplift: np.ndarray,
        attributed: np.ndarray,
        baseline: np.ndarray,
        model: MessageModel | None,
        catalog: MessageCatalog,
        traits: Mapping[str, Mapping[str, Any]],
        personas: Mapping[int, Mapping[str, Any]],
    ) -> dict[str, Any]:
        s = self.settings
        request, k = p.request, len(p.candidates)
        scores = uplift[p.first : p.first + k].tolist()
        if p.personalized:
            best = max(range(k), key=scores.__getitem__)
            greedy = best + 1 if model is None or scores[best] > s.min_uplift else 0  # 0 = send nothing
            epsilon = s.cold_start_exploration if model is None else s.exploration
        else:  # rules baseline of an experiment: the most urgent trigger, no model, no exploration
            greedy = 1 + min(range(k), key=lambda j: RULE_PRIORITY[p.candidates[j].template.trigger])
            epsilon = 0.0
        # Action 0 is "send nothing", 1..k the candidates; the random control group comes on top.
        probabilities = [epsilon / (k + 1)] * (k + 1)
        probabilities[greedy] += 1.0 - epsilon
        u_control, u_action = _uniforms(s.salt, request.visitor_id, request.channel, p.send_at.date().isoformat())
        control = u_control < s.control_rate
        reason = ""
        if control:
            action, reason = 0, "control_group"
        else:
            action, mass = k, 0.0
            for a, probability in enumerate(probabilities):
                mass += probability
                if u_action < mass:
                    action = a
                    break
            if action == 0:
                reason = "no_expected_uplift" if greedy == 0 and model is not None else "exploration"
        # Earlier decisions of this batch may have used up a cap or started a cooldown for this visitor.
        if action > 0:
            cap = p.history.cap_reached(request.channel, p.send_at, s)
            if cap is not None:
                return self._none(request, "frequency_cap", f"{cap} cap reached", p.experiment)
            if p.history.cooling(p.candidates[action - 1].template, p.send_ts):
                return self._none(request, "cooldown", "every eligible message is cooling down", p.experiment)
        # What the logging policy gave this action, control group included (offline evaluation divides by it).
        propensity = (1.0 - s.control_rate) * probabilities[action] + (s.control_rate if action == 0 else 0.0)
        recommendation_id = next_id()
        snapshot = catalog.snapshot
        version = model.version if model else None
        ids = snapshot.ids
        # Only logged decisions need their candidates as text.
        candidates_text = (
            ""
            if request.dry_run
            else encode_candidates(
                (c.template.item_id, ids[c.product] if c.product >= 0 else None) for c in p.candidates
            )
        )
        if action == 0:
            detail = {
                "control_group": "random control group: measures what messages add over sending nothing",
                "no_expected_uplift": f"no message is expected to add over {s.min_uplift:.2%} purchase probability",
                "exploration": "exploration: sending nothing this time to keep the model's estimates honest",
            }[reason]
            result = self._none(request, reason, detail, p.experiment, recommendation_id)
            result["model_version"] = version
            # When the message would have gone out: outcomes of "nothing sent" are measured from then.
            result["planned_send_at"] = p.send_at.isoformat()
            if request.explain:
                result["candidates"] = self._explained(p, scores, snapshot)
            if not request.dry_run:
                self._log(p, recommendation_id, None, None, propensity, control, reason, candidates_text, version, "")
            return result

        chosen = p.candidates[action - 1]
        template = chosen.template
        product = chosen.product
        row_baseline = float(baseline[p.row]) if len(baseline) else 0.0
        persona = personas.get(p.view.persona_id) if p.view.persona_id >= 0 else None
        tone, tone_reason = tone_for(p.view, persona)
        locale = p.view.locale if p.view.locale in ("id", "en") else "id"
        tokens = self._tokens(p, chosen, traits.get(request.visitor_id, {}), snapshot, locale)
        title, body, used_locale, used_tone = render(template, locale, tone, tokens)
        deep_link = fill(template.deep_link, tokens)
        score = float(scores[action - 1])
        zone_name = p.send_at.tzname() or "local"
        reasons = [
            chosen.reason,
            f"send at {p.send_at:%H:%M} {zone_name}: "
            + ("their most active hour left today" if p.view.histogram else "default hour (active hours unknown)"),
            f"{used_tone} tone: {tone_reason}",
        ]
        if model is not None:
            reasons.append(f"expected uplift {score:+.2%} purchase probability (baseline {row_baseline:.1%})")
        if reason == "exploration" or action != greedy:
            reasons.append("exploration: a less certain message, to keep learning")
        product_out = None
        if product >= 0:
            product_out = {
                "item_id": snapshot.ids[product],
                "title": snapshot.titles[product],
                "category": snapshot.categories[product],
                "price": None if math.isnan(catalog.price[product]) else catalog.price[product],
                "discount": round(catalog.discount[product], 4),
                "url": snapshot.urls[product],
                "image_url": snapshot.image_urls[product],
            }
        if not request.dry_run:
            p.history.record(p.send_ts, request.channel, template.item_id)
            self._log(
                p,
                recommendation_id,
                template,
                snapshot.ids[product] if product >= 0 else None,
                propensity,
                False,
                "send",
                candidates_text,
                version,
                used_tone,
                score,
            )
            SENDS.labels(request.channel, template.trigger).inc()
            if p.experiment is not None:
                self._record_exposure(p, recommendation_id, template.item_id, persona)
        answer: dict[str, Any] = {
            "recommendation_id": recommendation_id,
            "visitor_id": request.visitor_id,
            "channel": request.channel,
            "action": "send",
            "message": {
                "item_id": template.item_id,
                "name": template.name,
                "trigger": template.trigger,
                "title": title,
                "body": body,
                "locale": used_locale,
                "tone": used_tone,
                "deep_link": deep_link,
            },
            "product": product_out,
            "send_at": p.send_at.isoformat(),
            "reasons": reasons,
            "score": round(score, 6),
            "propensity": round(propensity, 6),
            "experiment": {"key": p.experiment[0], "arm": p.experiment[1]} if p.experiment else None,
            "model_version": version,
            "dry_run": request.dry_run,
        }
        if request.explain:
            answer["candidates"] = self._explained(p, scores, snapshot)
        return answer

    @staticmethod
    def _explained(p: _Planned, scores: Sequence[float], snapshot: ItemSnapshot) -> list[dict[str, Any]]:
        return [
            {
                "item_id": c.template.item_id,
                "trigger": c.template.trigger,
                "product_id": snapshot.ids[c.product] if c.product >= 0 else None,
                "reason": c.reason,
                "score": round(float(score), 6),
            }
            for c, score in zip(p.candidates, scores, strict=True)
        ]

    def _record_exposure(
        self, p: _Planned, recommendation_id: str, template_id: str, persona: Mapping[str, Any] | None
    ) -> None:
        """A message sent under an experiment arm: its opens, clicks and purchases count for the arm."""
        record = getattr(self.experiments, "record_message_exposure", None)
        if record is None or p.experiment is None:
            return
        try:
            record(
                p.request.visitor_id,
                p.experiment[0],
                p.experiment[1],
                p.request.channel,
                recommendation_id,
                now=p.now,
                persona=str(persona.get("name_en")) if persona else None,
                item_id=template_id,
            )
        except Exception as exc:  # experiments must never take messages down
            log.warning("message exposure not recorded: %s", type(exc).__name__)

    def _tokens(
        self, p: _Planned, chosen: Candidate, traits: Mapping[str, Any], snapshot: ItemSnapshot, locale: str
    ) -> dict[str, str]:
        product = chosen.product
        name = traits.get("first_name")
        first_name = str(name).strip().split(" ")[0].title() if isinstance(name, str) and name.strip() else ""
        discount = float(snapshot.discount[product]) if product >= 0 else 0.0
        if discount <= 0:
            discount = self.settings.voucher_discount
        category = (snapshot.categories[product] if product >= 0 else None) or (
            p.view.categories[0] if p.view.categories else ""
        )
        tokens = {
            "first_name": first_name or FALLBACK_NAME.get(locale, "friend"),
            "category": category.replace("-", " "),
            "discount": f"{round(discount * 100)}%",
        }
        if product >= 0:
            price = float(snapshot.price[product])
            tokens.update(
                product=snapshot.titles[product],
                price=format_price(price, locale) if price == price else "",
                item_id=snapshot.ids[product],
                brand=snapshot.brands[product] or "",
            )
        return tokens

    def _none(
        self,
        request: MessageRequest,
        reason: str,
        detail: str,
        experiment: tuple[str, str] | tuple[str, str, bool] | None = None,
        recommendation_id: str | None = None,
    ) -> dict[str, Any]:
        return {
            "recommendation_id": recommendation_id,
            "visitor_id": request.visitor_id,
            "channel": request.channel,
            "action": "none",
            "reason": reason,
            "detail": detail,
            "experiment": {"key": experiment[0], "arm": experiment[1]} if experiment else None,
            "dry_run": request.dry_run,
        }

    def _log(
        self,
        p: _Planned,
        recommendation_id: str,
        template: Template | None,
        product_id: str | None,
        propensity: float,
        control: bool,
        reason: str,
        candidates: str,
        model_version: str | None,
        tone: str,
        score: float = 0.0,
    ) -> None:
        request = p.request
        properties: dict[str, Any] = {
            "action": "send" if template else "none",
            "channel": request.channel,
            "propensity": round(propensity, 6),
            "candidates": candidates[:512],
            "decided_at": round(p.now, 3),
            "control": control,
            "reason": reason,
            "score": round(score, 6),
        }
        if template is not None:
            properties["trigger"] = template.trigger
            properties["tone"] = tone
        if product_id:
            properties["product_id"] = product_id
        if model_version:
            properties["model"] = model_version
        if p.experiment:
            properties["experiment"], properties["arm"] = p.experiment
        event = Event(
            event_id=f"msg:{recommendation_id}",
            visitor_id=request.visitor_id,
            type=EventType.MESSAGE_SENT,
            timestamp=p.send_at.astimezone(UTC),
            item_id=template.item_id if template else NONE_ACTION,
            recommendation_id=recommendation_id,
            context=EventContext(channel=request.channel, city=str(p.view.row.get("city") or "") or None),
            properties=properties,
        )
        record = {
            "visitor_id": request.visitor_id,
            "ts": p.now,
            "kind": "message",
            "channel": request.channel,
            "message": template.item_id if template else None,
            "trigger": template.trigger if template else None,
            "product": product_id,
            "send_at": p.send_ts,
            "control": control,
            "experiment": p.experiment[0] if p.experiment else None,
            "arm": p.experiment[1] if p.experiment else None,
            "persona": p.view.persona_id if p.view.persona_id >= 0 else None,
        }
        if not self.repository.log_decision(event, recommendation_id, record, self.recommendation_ttl_s):
            DECISIONS_DROPPED.inc()


__all__ = [
    "CHANNELS",
    "TRIGGERS",
    "MessageBatchRequest",
    "MessageRequest",
    "MessageService",
    "MessageSettings",
    "SendHistory",
    "plan_send",
    "render",
    "tone_for",
]
