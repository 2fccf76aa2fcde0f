"""Simulated shop visitors with hidden tastes: browsing history, reactions to recommendations and messages.

Each visitor belongs to one of five hidden types and gets personal tastes sampled around the type. The
same taste (`Simulator.utility`) drives what they browse in `history`, what they click in `respond` and
what they buy after a message in `respond_message`, so a service that learns the tastes from the history
is rewarded with more clicks and purchases: that is what makes the simulator useful for evaluation.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Final

import numpy as np

from services.common.catalog import MESSAGE_TRIGGERS, CatalogItem, ItemKind
from services.common.context import is_payday_window
from services.common.events import Device, Event, EventContext, EventType
from services.demo.catalogue import CATEGORIES, CATEGORY_BY_SLUG
from services.demo.shop import DemoShop
from services.demo.visitor_types import (
    CHANNEL_OPEN_DELAY,
    CHANNEL_OPEN_RATE,
    CITY_REGIONS,
    CITY_WEIGHTS,
    FIRST_NAMES,
    TYPE_PROFILES,
    VISITOR_TYPES,
    SimVisitor,
    TypeProfile,
)

logger = logging.getLogger(__name__)

TRIGGERS: Final = MESSAGE_TRIGGERS
# A purchase within this many hours after `now` counts as "would have bought anyway".
ORGANIC_WINDOW_HOURS: Final = 72.0
DAY_SECONDS: Final = 86_400.0

# Click model: logit = base + utility, times the position examination and the time-of-day attention.
PRODUCT_CLICK_BASE: Final = -2.6
CREATIVE_CLICK_BASE: Final = -3.0
POSITION_DECAY: Final = 0.6  # examination probability (1 + position) ** -POSITION_DECAY, position 0-based
MAX_PROBABILITY: Final = 0.95
DISCOUNT_WEIGHT: Final = 4.5  # utility per unit of discount fraction at discount sensitivity 1
PRICE_SCALE: Final = 0.7  # log-price distance that counts as "one step" away from the preferred price


@dataclass(frozen=True)
class ShownItem:
    """One item the service showed in a slot (position is 0-based: 0 is the first)."""

    item_id: str
    position: int
    kind: str = "product"


@dataclass
class _VisitorState:
    """What `history` has to remember about a visitor between sessions."""

    cart: dict[int, int] = field(default_factory=dict)  # product index -> quantity
    sessions: int = 0
    events: int = 0
    profiled: bool = False


@dataclass
class _Session:
    """Builds the events of one session in time order."""

    visitor: SimVisitor
    state: _VisitorState
    context: EventContext
    moment: datetime
    seed: int
    events: list[Event] = field(default_factory=list)

    def emit(self, event_type: EventType, **fields: Any) -> None:
        self.state.events += 1
        event_id = f"sim{self.seed}-{self.visitor.visitor_id}-{self.state.events:06d}"
        self.events.append(
            Event(
                event_id=event_id,
                visitor_id=self.visitor.visitor_id,
                type=event_type,
                timestamp=self.moment,
                context=self.context,
                **fields,
            )
        )


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _cdf(weights: Sequence[float]) -> np.ndarray:
    cumulative: np.ndarray = np.cumsum(np.asarray(weights, dtype=float))
    return cumulative / cumulative[-1]


def _draw(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """One index drawn from a normalised cumulative distribution."""
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


def _stable_hash(*parts: object) -> int:
    """A seed from strings that does not change between runs (Python's hash() is salted)."""
    digest = hashlib.blake2b("\x1f".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _hour_weights(peaks: Sequence[tuple[float, float, float]]) -> np.ndarray:
    """24 weights from bumps on the circular clock, with a floor so any hour is possible."""
    hours = np.arange(24, dtype=float)
    weights = np.full(24, 0.015)
    for peak, width, weight in peaks:
        distance = np.abs(hours - peak)
        distance = np.minimum(distance, 24.0 - distance)
        weights += weight * np.exp(-0.5 * (distance / width) ** 2)
    normalised: np.ndarray = weights / weights.sum()
    return normalised


class Simulator:
    """Visitors with hidden tastes who browse the demo shop and react to what the service shows them.

    `history` is reproducible (same seed, same events, on every call). `respond` and `respond_message` draw
    from a random stream keyed by seed, visitor and recommendation id, so they are reproducible too and
    independent of call order.
    """

    def __init__(self, shop: DemoShop, n_visitors: int = 1000, seed: int = 7, start: datetime | None = None) -> None:
        if start is None:
            start = shop.generated_at - timedelta(days=30)
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self.shop = shop
        self.seed = seed
        self.start = start
        self._items: dict[str, CatalogItem] = shop.by_id()
        self._products = list(shop.products)
        self._product_index = {item.item_id: index for index, item in enumerate(self._products)}
        self._categories = [spec.slug for spec in CATEGORIES]
        category_index = {slug: index for index, slug in enumerate(self._categories)}
        self._brands = sorted({item.brand or "" for item in self._products})
        brand_index = {brand: index for index, brand in enumerate(self._brands)}

        prices = np.array([item.price or 0.0 for item in self._products])
        self._log_price = np.log(np.maximum(prices, 1.0))
        self._discount = np.array([item.discount for item in self._products])
        self._product_category = np.array([category_index[item.category or ""] for item in self._products])
        self._product_brand = np.array([brand_index[item.brand or ""] for item in self._products])
        self._in_stock = np.array([item.in_stock for item in self._products])
        self._created_ts = np.array(
            [item.created_at.timestamp() if item.created_at else -math.inf for item in self._products]
        )
        self._category_members = [
            np.flatnonzero(self._product_category == index) for index in range(len(self._categories))
        ]
        # What an "ordinary" price is in each category: the target prices are relative to it.
        self._category_log_median = np.array(
            [float(np.median(self._log_price[members])) for members in self._category_members]
        )

        rng = np.random.default_rng([seed, 0])
        self.visitors: list[SimVisitor] = [self._sample_visitor(rng, index) for index in range(n_visitors)]
        self._visitor_index = {visitor.visitor_id: index for index, visitor in enumerate(self.visitors)}
        self._utility = self._utilities()
        # Per-visitor arrays for the hot loop of `history` (numpy's choice(p=...) is slow for single draws).
        self._prefs = np.array(
            [[visitor.category_prefs[slug] for slug in self._categories] for visitor in self.visitors]
        ).reshape(len(self.visitors), len(self._categories))
        self._hour_cdf = np.cumsum(
            np.array([visitor.hour_weights for visitor in self.visitors]).reshape(len(self.visitors), 24),
            axis=1,
        )
        self._referrers = {
            name: (list(profile.referrers), _cdf(list(profile.referrers.values())))
            for name, profile in TYPE_PROFILES.items()
        }

    # ----------------------------------------------------------------------------------------- visitors

    def _sample_visitor(self, rng: np.random.Generator, index: int) -> SimVisitor:
        shares = np.array([TYPE_PROFILES[name].share for name in VISITOR_TYPES])
        hidden_type = VISITOR_TYPES[int(rng.choice(len(VISITOR_TYPES), p=shares / shares.sum()))]
        profile = TYPE_PROFILES[hidden_type]

        base = np.array([profile.category_weights.get(slug, profile.other_weight) for slug in self._categories])
        alpha = base / base.sum() * profile.category_concentration + 0.02
        prefs = rng.dirichlet(alpha)
        category_prefs = {slug: float(pref) for slug, pref in zip(self._categories, prefs, strict=True)}

        # Favourite brands in the visitor's top categories; loyal types weigh them heavily.
        brand_prefs: dict[str, float] = {}
        for category in np.argsort(-prefs)[:3]:
            brands = CATEGORY_BY_SLUG[self._categories[int(category)]].brands
            for pick in rng.choice(len(brands), size=min(2, len(brands)), replace=False):
                bonus = profile.brand_loyalty * float(rng.lognormal(0.0, 0.25))
                brand_prefs[brands[int(pick)]] = max(brand_prefs.get(brands[int(pick)], 0.0), bonus)

        peaks = tuple(
            (float((hour + rng.normal(0.0, 0.6)) % 24), width, weight) for hour, width, weight in profile.hour_peaks
        )
        devices = list(profile.devices)
        device_p = np.array([profile.devices[name] for name in devices])
        device = devices[int(rng.choice(len(devices), p=device_p / device_p.sum()))]
        cities = list(CITY_WEIGHTS)
        city_p = np.array([CITY_WEIGHTS[name] for name in cities])
        city = cities[int(rng.choice(len(cities), p=city_p / city_p.sum()))]
        first_day = int(rng.integers(1, 28)) if rng.random() < profile.new_share else 0
        churn_day = first_day + int(rng.integers(3, 21)) if rng.random() < profile.churn_rate else None
        return SimVisitor(
            visitor_id=f"v{index + 1:06d}",
            hidden_type=hidden_type,
            first_name=FIRST_NAMES[int(rng.integers(len(FIRST_NAMES)))],
            city=city,
            region=CITY_REGIONS[city],
            locale="en" if rng.random() < profile.en_share else "id",
            device=device,
            channel="app" if device == "app" else "web",
            category_prefs=category_prefs,
            brand_prefs=brand_prefs,
            price_level=profile.price_level + float(rng.normal(0.0, 0.2)),
            price_sensitivity=float(np.clip(profile.price_sensitivity + rng.normal(0.0, 0.08), 0.0, 1.0)),
            discount_sensitivity=float(np.clip(profile.discount_sensitivity + rng.normal(0.0, 0.08), 0.0, 1.0)),
            hour_weights=tuple(float(weight) for weight in _hour_weights(peaks)),
            visits_per_week=profile.visits_per_week * float(rng.lognormal(0.0, 0.3)),
            session_views=max(1.0, profile.session_views * float(rng.lognormal(0.0, 0.2))),
            first_day=first_day,
            churn_day=churn_day,
        )

    def _utilities(self) -> np.ndarray:
        """Taste of every visitor for every product, in log-odds units (the one ground truth)."""
        n_categories = len(self._categories)
        category_prefs = np.array(
            [[visitor.category_prefs[slug] for slug in self._categories] for visitor in self.visitors]
        ).reshape(len(self.visitors), n_categories)
        category_term = np.clip(np.log(category_prefs * n_categories + 1e-9), -3.5, 2.5)
        brand_bonus = np.zeros((len(self.visitors), len(self._brands)))
        brand_index = {brand: index for index, brand in enumerate(self._brands)}
        for row, visitor in enumerate(self.visitors):
            for brand, bonus in visitor.brand_prefs.items():
                if brand in brand_index:
                    brand_bonus[row, brand_index[brand]] = bonus
        level = np.array([visitor.price_level for visitor in self.visitors])[:, None]
        price_sens = np.array([visitor.price_sensitivity for visitor in self.visitors])[:, None]
        discount_sens = np.array([visitor.discount_sensitivity for visitor in self.visitors])[:, None]
        target = self._category_log_median[self._product_category][None, :] + level
        distance = (self._log_price[None, :] - target) / PRICE_SCALE
        price_term = np.maximum(-(0.3 + 1.5 * price_sens) * 0.5 * distance**2, -4.0)
        utility: np.ndarray = (
            category_term[:, self._product_category]
            + brand_bonus[:, self._product_brand]
            + price_term
            + DISCOUNT_WEIGHT * discount_sens * self._discount[None, :]
        )
        return utility.astype(np.float32)

    def visitor(self, visitor_id: str) -> SimVisitor:
        return self.visitors[self._index_of(visitor_id)]

    def utilities(self, visitor_id: str) -> np.ndarray:
        """The visitor's hidden utility for every product, aligned with `shop.products` (a copy)."""
        return np.array(self._utility[self._index_of(visitor_id)], dtype=np.float64)

    def _index_of(self, visitor_id: str) -> int:
        try:
            return self._visitor_index[visitor_id]
        except KeyError:
            raise KeyError(f"unknown visitor {visitor_id!r}") from None

    def _item(self, item_id: str) -> CatalogItem:
        try:
            return self._items[item_id]
        except KeyError:
            raise KeyError(f"item {item_id!r} is not in the demo shop") from None

    def utility(self, visitor_id: str, item_id: str, now: datetime | None = None) -> float:
        """How much the visitor likes the item, in log-odds units (0 is neutral)."""
        row = self._index_of(visitor_id)
        item = self._item(item_id)
        if item.kind is ItemKind.PRODUCT:
            return float(self._utility[row, self._product_index[item_id]])
        return self._creative_utility(self.visitors[row], item, now)

    def _creative_utility(self, visitor: SimVisitor, item: CatalogItem, now: datetime | None) -> float:
        """Banners, CTAs and messages: the categories they are about, their tags and their targeting."""
        profile = TYPE_PROFILES[visitor.hidden_type]
        targeting = item.targeting
        utility = 0.0
        if targeting.categories:
            share = sum(visitor.category_prefs.get(slug, 0.0) for slug in targeting.categories)
            utility += float(np.clip(math.log(share / len(targeting.categories) * len(self._categories)), -3, 2))
        utility += sum(profile.tag_affinity.get(tag, 0.0) for tag in item.tags)
        local = now.astimezone(visitor.zone) if now is not None else None
        payday = local is not None and is_payday_window(local.day)
        # Mis-targeted creatives feel irrelevant: a desktop banner on a phone, a payday voucher on the 15th.
        if targeting.devices and visitor.device not in targeting.devices:
            utility -= 0.7
        if targeting.cities and visitor.city not in targeting.cities:
            utility -= 0.7
        if local is not None and targeting.hours and local.hour not in targeting.hours:
            utility -= 0.4
        if targeting.payday_only and not payday:
            utility -= 0.7
        return utility

    # ------------------------------------------------------------------------------------ ground truth

    def _attention(self, visitor: SimVisitor, local: datetime) -> float:
        """Visitors pay more attention at the hours they usually shop."""
        peak = max(visitor.hour_weights)
        return 0.55 + 0.45 * visitor.hour_weights[local.hour] / peak

    def click_probability(self, visitor_id: str, item_id: str, position: int, now: datetime) -> float:
        """Ground truth: the chance the visitor clicks the item shown at `position` (0-based) at `now`."""
        if position < 0:
            raise ValueError("position is 0-based and cannot be negative")
        visitor = self.visitors[self._index_of(visitor_id)]
        item = self._item(item_id)
        local = now.astimezone(visitor.zone)
        if item.kind is ItemKind.PRODUCT:
            logit = PRODUCT_CLICK_BASE + self.utility(visitor_id, item_id)
            # Deal hunters on payday jump at discounts even more.
            if visitor.hidden_type == "deal_hunter" and item.discount > 0 and is_payday_window(local.day):
                logit += 0.5
            if not item.in_stock:
                logit -= 0.5
        else:
            logit = CREATIVE_CLICK_BASE + self._creative_utility(visitor, item, now)
        examination = (1.0 + position) ** -POSITION_DECAY
        probability = _sigmoid(logit) * examination * self._attention(visitor, local)
        return min(MAX_PROBABILITY, probability)

    def _cart_probability(self, visitor: SimVisitor, row: int, product: int, after_click: bool) -> float:
        if not self._in_stock[product]:
            return 0.0
        profile = TYPE_PROFILES[visitor.hidden_type]
        appeal = 0.5 + _sigmoid(float(self._utility[row, product]))  # 0.5 .. 1.5
        # A click on a recommendation is a stronger signal of intent than a browsing view.
        rate = profile.cart_rate * appeal * (2.0 if after_click else 1.0)
        return min(MAX_PROBABILITY, rate)

    def _checkout_probability(self, visitor: SimVisitor, local: datetime) -> float:
        profile = TYPE_PROFILES[visitor.hidden_type]
        factor = profile.payday_checkout_factor if is_payday_window(local.day) else profile.off_payday_checkout_factor
        return min(MAX_PROBABILITY, profile.checkout_rate * factor)

    def _day(self, moment: datetime) -> float:
        return (moment - self.start).total_seconds() / DAY_SECONDS

    def organic_purchase_probability(self, visitor_id: str, now: datetime) -> float:
        """Ground truth: chance the visitor buys within ORGANIC_WINDOW_HOURS after `now` with no message."""
        visitor = self.visitors[self._index_of(visitor_id)]
        profile = TYPE_PROFILES[visitor.hidden_type]
        local = now.astimezone(visitor.zone)
        rate = profile.daily_purchase_rate * visitor.visits_per_week / profile.visits_per_week
        if is_payday_window(local.day):
            rate *= profile.payday_checkout_factor
        else:
            rate *= profile.off_payday_checkout_factor
        if visitor.is_dormant(self._day(now)):
            rate *= 0.1
        return 1.0 - math.exp(-rate * ORGANIC_WINDOW_HOURS / 24.0)

    def message_probabilities(
        self, visitor_id: str, message_item_id: str, product_id: str | None, channel: str, sent_at: datetime
    ) -> tuple[float, float, float]:
        """Ground truth for a message: P(open), P(click | open), P(purchase | click)."""
        visitor = self.visitors[self._index_of(visitor_id)]
        profile = TYPE_PROFILES[visitor.hidden_type]
        template = self._item(message_item_id).message
        if template is None:
            raise ValueError(f"{message_item_id!r} is not a message template")
        if channel not in CHANNEL_OPEN_RATE:
            raise ValueError(f"unknown channel {channel!r}")
        trigger = template.trigger
        local = sent_at.astimezone(visitor.zone)
        payday = is_payday_window(local.day)
        affinity = profile.trigger_affinity[trigger]
        if visitor.hidden_type == "busy_professional" and trigger == "cart_abandonment" and 11 <= local.hour <= 13:
            affinity *= 1.6
        if trigger == "payday_promo":
            if visitor.hidden_type == "deal_hunter":
                affinity *= 1.5 if payday else 0.5
            elif not payday:
                affinity *= 0.7
        relevance = 1.0
        if product_id is not None:
            relevance = 2.0 * _sigmoid(self.utility(visitor_id, product_id))  # 0 .. 2
        p_open = (
            CHANNEL_OPEN_RATE[channel]
            * profile.channel_affinity[channel]
            * affinity
            * self._attention(visitor, local)
            * (0.7 + 0.3 * relevance)
        )
        if visitor.is_dormant(self._day(sent_at)):
            # Dormant visitors rarely react; a win-back message is the one thing that sometimes reaches them.
            p_open *= 0.6 if trigger == "win_back" else 0.2
        p_click = 0.15 + 0.2 * relevance * math.sqrt(affinity) / 1.5
        p_purchase = profile.message_conversion * (0.5 + 0.5 * relevance)
        if trigger in ("cart_abandonment", "price_drop"):
            p_purchase *= 1.3
        if visitor.hidden_type == "deal_hunter" and payday:
            p_purchase *= 1.5
        return (
            # Saturate smoothly instead of clipping, so favourable factors still rank above each other.
            min(MAX_PROBABILITY, 1.0 - math.exp(-p_open)),
            min(MAX_PROBABILITY, p_click),
            min(MAX_PROBABILITY, p_purchase),
        )

    # ----------------------------------------------------------------------------------------- history

    def history(self, days: int) -> Iterator[Event]:
        """Time-ordered behaviour events of all visitors over `days` days after `start`.

        Sessions start inside [start, start + days) at the visitor's active local hours; a session's last
        events can end a few minutes after the window.
        """
        if days < 0:
            raise ValueError("days cannot be negative")
        rng = np.random.default_rng([self.seed, 1])
        states = [_VisitorState() for _ in self.visitors]
        cdf_cache: dict[tuple[int, int], np.ndarray] = {}
        end = self.start + timedelta(days=days)
        zones = sorted({visitor.zone for visitor in self.visitors}, key=lambda zone: str(zone))
        buffer: list[tuple[float, int, Event]] = []
        sequence = 0
        for day in range(days + 1):
            for row, visitor in enumerate(self.visitors):
                day_start = self._local_midnight(visitor.zone, day)
                for session_start in self._session_starts(rng, visitor, day, day_start):
                    if not self.start <= session_start < end:
                        continue
                    for event in self._session(rng, row, visitor, states[row], session_start, cdf_cache):
                        buffer.append((event.ts, sequence, event))
                        sequence += 1
            # Sessions of later days start after the earliest local midnight of the next day: all events
            # before it are final and can be released in order.
            bound = min(self._local_midnight(zone, day + 1) for zone in zones).timestamp() if zones else math.inf
            if day == days:
                bound = math.inf
            buffer.sort(key=lambda entry: (entry[0], entry[1]))
            cut = 0
            while cut < len(buffer) and buffer[cut][0] < bound:
                cut += 1
            for _, _, event in buffer[:cut]:
                yield event
            del buffer[:cut]

    def _local_midnight(self, zone: timezone, day: int) -> datetime:
        local_date: date = (self.start + timedelta(days=day)).astimezone(zone).date()
        return datetime(local_date.year, local_date.month, local_date.day, tzinfo=zone)

    def _session_starts(
        self, rng: np.random.Generator, visitor: SimVisitor, day: int, day_start: datetime
    ) -> list[datetime]:
        if day < visitor.first_day:
            return []
        profile = TYPE_PROFILES[visitor.hidden_type]
        rate = visitor.visits_per_week / 7.0
        if day_start.weekday() >= 5:
            rate *= profile.weekend_factor
        if is_payday_window(day_start.day):
            rate *= profile.payday_visit_factor
        if visitor.is_dormant(day):
            rate *= 0.03
        # Everyone who arrives in the window comes at least once on their first day.
        count = int(rng.poisson(rate))
        if day == visitor.first_day:
            count = max(count, 1)
        if count == 0:
            return []
        row = self._visitor_index[visitor.visitor_id]
        hours = np.minimum(np.searchsorted(self._hour_cdf[row], rng.random(count) * self._hour_cdf[row, -1]), 23)
        seconds = rng.uniform(0, 3600, size=count)
        return sorted(
            day_start + timedelta(hours=int(hour), seconds=float(second))
            for hour, second in zip(hours, seconds, strict=True)
        )

    def _pick_product(
        self,
        rng: np.random.Generator,
        row: int,
        category: int,
        not_after: float,
        cdf_cache: dict[tuple[int, int], np.ndarray],
    ) -> int | None:
        """A product of the category, drawn in proportion to the visitor's taste (exp of the utility)."""
        key = (row, category)
        cdf = cdf_cache.get(key)
        members = self._category_members[category]
        if cdf is None:
            weights = np.exp(self._utility[row, members].astype(np.float64))
            cdf = np.cumsum(weights)
            cdf /= cdf[-1]
            cdf_cache[key] = cdf
        # Products launched later than the view cannot have been seen: redraw a few times.
        for _ in range(4):
            product = int(members[min(int(np.searchsorted(cdf, rng.random())), len(members) - 1)])
            if self._created_ts[product] <= not_after:
                return product
        return None

    def _session(
        self,
        rng: np.random.Generator,
        row: int,
        visitor: SimVisitor,
        state: _VisitorState,
        start: datetime,
        cdf_cache: dict[tuple[int, int], np.ndarray],
    ) -> list[Event]:
        profile = TYPE_PROFILES[visitor.hidden_type]
        state.sessions += 1
        local = start.astimezone(visitor.zone)
        referrers, referrer_cdf = self._referrers[visitor.hidden_type]
        referrer = referrers[_draw(rng, referrer_cdf)]
        context = EventContext(
            device=Device(visitor.device),
            channel=visitor.channel,
            city=visitor.city,
            region=visitor.region,
            locale=visitor.locale,
            referrer=referrer or None,
            session_id=f"{visitor.visitor_id}-s{state.sessions:04d}",
        )
        session = _Session(visitor, state, context, local, self.seed)

        def advance(scale: float = 1.0) -> None:
            gap = profile.view_gap_seconds * scale * float(rng.lognormal(0.0, 0.5))
            session.moment = session.moment + timedelta(seconds=max(1.0, gap))

        if not state.profiled:
            state.profiled = True
            session.emit(
                EventType.PROFILE_UPDATE,
                properties={"first_name": visitor.first_name, "locale": visitor.locale, "city": visitor.city},
            )
            advance(0.1)
        session.emit(EventType.PAGE_VIEW, properties={"page": "home"})

        # The categories this session is about: weighted draw without replacement (Efraimidis-Spirakis).
        keys = np.log(rng.random(len(self._categories))) / np.maximum(self._prefs[row], 1e-12)
        focus = np.argsort(-keys)[: profile.session_categories]

        if rng.random() < profile.search_rate:
            advance(0.5)
            query = self._query(rng, profile, int(focus[0]))
            session.emit(EventType.SEARCH, query=query, properties={"results": int(rng.integers(12, 400))})
        else:
            advance(0.5)
            slug = self._categories[int(focus[0])]
            session.emit(EventType.PAGE_VIEW, properties={"page": "category", "category": slug})

        n_views = 1 + int(rng.poisson(max(0.0, visitor.session_views - 1.0)))
        viewed: list[int] = []
        for view in range(n_views):
            advance()
            product: int | None
            if viewed and rng.random() < profile.revisit_rate:
                product = viewed[int(rng.integers(len(viewed)))]
            else:
                category = int(focus[0]) if view == 0 else int(focus[int(rng.integers(len(focus)))])
                product = self._pick_product(rng, row, category, session.moment.timestamp(), cdf_cache)
            if product is None:
                continue
            viewed.append(product)
            item = self._products[product]
            session.emit(
                EventType.PRODUCT_VIEW,
                item_id=item.item_id,
                price=item.price,
                properties={"category": item.category, "brand": item.brand, "discounted": item.discount > 0},
            )
            if product not in state.cart and rng.random() < self._cart_probability(visitor, row, product, False):
                advance(0.3)
                quantity = self._quantity(rng, visitor, item)
                state.cart[product] = quantity
                session.emit(EventType.ADD_TO_CART, item_id=item.item_id, quantity=quantity, price=item.price)

        if state.cart and rng.random() < profile.remove_rate:
            advance(0.5)
            removed = list(state.cart)[int(rng.integers(len(state.cart)))]
            quantity = state.cart.pop(removed)
            item = self._products[removed]
            session.emit(EventType.REMOVE_FROM_CART, item_id=item.item_id, quantity=quantity, price=item.price)

        if state.cart and rng.random() < self._checkout_probability(visitor, local):
            advance()
            session.emit(EventType.PAGE_VIEW, properties={"page": "checkout"})
            advance(2.0)
            order_id = f"o{self.seed}-{visitor.visitor_id}-{state.sessions:04d}"
            for product, quantity in sorted(state.cart.items()):
                item = self._products[product]
                session.emit(
                    EventType.PURCHASE,
                    item_id=item.item_id,
                    quantity=quantity,
                    price=item.price,
                    properties={"order_id": order_id, "category": item.category},
                )
            state.cart.clear()
        return session.events

    def _quantity(self, rng: np.random.Generator, visitor: SimVisitor, item: CatalogItem) -> int:
        spec = CATEGORY_BY_SLUG.get(item.category or "")
        if spec is not None and spec.consumable:
            # Groceries go in by the handful; deal hunters stock up.
            extra = 1.5 if visitor.hidden_type == "deal_hunter" else 0.6
            return 1 + int(rng.poisson(extra))
        return 2 if rng.random() < 0.05 else 1

    def _query(self, rng: np.random.Generator, profile: TypeProfile, category: int) -> str:
        """An Indonesian search query about the category, worded the way this type searches."""
        spec = CATEGORIES[category]
        line = spec.lines[int(rng.integers(len(spec.lines)))]
        word = profile.search_words[int(rng.integers(len(profile.search_words)))]
        roll = rng.random()
        if roll < 0.45:
            query = f"{line.noun} {word}"
        elif roll < 0.75:
            brand = line.brands[int(rng.integers(len(line.brands)))]
            query = f"{brand} {line.noun}"
        elif roll < 0.9:
            query = f"{spec.name_id} {word}"
        else:
            query = line.brands[int(rng.integers(len(line.brands)))]
        return " ".join(query.lower().split())

    # ---------------------------------------------------------------------------------------- responses

    def _response_rng(self, *parts: object) -> np.random.Generator:
        return np.random.default_rng([self.seed, 2, _stable_hash(*parts)])

    def _response_context(self, visitor: SimVisitor, session_id: str, channel: str | None = None) -> EventContext:
        return EventContext(
            device=Device(visitor.device),
            channel=channel or visitor.channel,
            city=visitor.city,
            region=visitor.region,
            locale=visitor.locale,
            session_id=session_id[:128],
        )

    @staticmethod
    def _response_event_id(*parts: object) -> str:
        return f"r{_stable_hash(*parts):016x}"

    def respond(
        self,
        visitor_id: str,
        shown: Sequence[ShownItem],
        now: datetime,
        recommendation_id: str,
        slot: str,
    ) -> list[Event]:
        """The visitor's reaction to a slot: clicks (`click_probability`), then add-to-cart and purchase."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        row = self._index_of(visitor_id)
        visitor = self.visitors[row]
        rng = self._response_rng("respond", visitor_id, recommendation_id, slot)
        local_now = now.astimezone(visitor.zone)
        context = self._response_context(visitor, f"{visitor_id}-{recommendation_id}")
        events: list[Event] = []

        def emit(event_type: EventType, moment: datetime, item_id: str, position: int, **fields: Any) -> None:
            # The position is part of the id so an item shown twice in one slot still gets distinct events.
            events.append(
                Event(
                    event_id=self._response_event_id(
                        visitor_id, recommendation_id, slot, event_type, item_id, position
                    ),
                    visitor_id=visitor_id,
                    type=event_type,
                    timestamp=moment,
                    item_id=item_id,
                    recommendation_id=recommendation_id,
                    context=context,
                    **fields,
                )
            )

        checkout = self._checkout_probability(visitor, local_now)
        for shown_item in sorted(shown, key=lambda entry: entry.position):
            probability = self.click_probability(visitor_id, shown_item.item_id, shown_item.position, now)
            if rng.random() >= probability:
                continue
            properties: dict[str, str | int | float | bool | None] = {
                "slot": slot,
                "position": shown_item.position,
                "kind": str(shown_item.kind),
            }
            moment = local_now + timedelta(seconds=2.0 + 3.0 * shown_item.position + float(rng.exponential(8.0)))
            emit(EventType.CLICK, moment, shown_item.item_id, shown_item.position, properties=properties)
            product = self._product_index.get(shown_item.item_id)
            if product is None:
                continue
            item = self._products[product]
            if rng.random() >= self._cart_probability(visitor, row, product, True):
                continue
            moment += timedelta(seconds=20.0 + float(rng.exponential(60.0)))
            quantity = self._quantity(rng, visitor, item)
            emit(
                EventType.ADD_TO_CART,
                moment,
                item.item_id,
                shown_item.position,
                quantity=quantity,
                price=item.price,
                properties={"slot": slot},
            )
            if rng.random() >= checkout:
                continue
            moment += timedelta(seconds=60.0 + float(rng.exponential(300.0)))
            emit(
                EventType.PURCHASE,
                moment,
                item.item_id,
                shown_item.position,
                quantity=quantity,
                price=item.price,
                properties={"slot": slot, "category": item.category},
            )
        events.sort(key=lambda event: event.ts)
        return events

    def _taste_pick(self, rng: np.random.Generator, row: int) -> int:
        """A product the visitor would buy on their own: category by preference, then by taste, in stock."""
        prefs = self._prefs[row] / self._prefs[row].sum()
        for _ in range(8):
            category = int(rng.choice(len(self._categories), p=prefs))
            members = self._category_members[category]
            weights = np.exp(self._utility[row, members].astype(np.float64)) * self._in_stock[members]
            if weights.sum() > 0:
                return int(members[int(rng.choice(len(members), p=weights / weights.sum()))])
        return int(np.argmax(self._utility[row] + np.where(self._in_stock, 0.0, -1e9)))

    def _organic_purchase(self, visitor_id: str, now: datetime, recommendation_id: str) -> list[Event]:
        row = self._index_of(visitor_id)
        visitor = self.visitors[row]
        rng = self._response_rng("organic", visitor_id, recommendation_id)
        if rng.random() >= self.organic_purchase_probability(visitor_id, now):
            return []
        product = self._taste_pick(rng, row)
        item = self._products[product]
        moment = now.astimezone(visitor.zone) + timedelta(hours=float(rng.uniform(0.0, ORGANIC_WINDOW_HOURS)))
        return [
            Event(
                event_id=self._response_event_id("organic", visitor_id, recommendation_id),
                visitor_id=visitor_id,
                type=EventType.PURCHASE,
                timestamp=moment,
                item_id=item.item_id,
                quantity=self._quantity(rng, visitor, item),
                price=item.price,
                context=self._response_context(visitor, f"{visitor_id}-organic-{recommendation_id}"),
                properties={"source": "organic", "category": item.category},
            )
        ]

    def respond_no_message(self, visitor_id: str, now: datetime, recommendation_id: str) -> list[Event]:
        """What happens when nothing is sent: only the organic purchase (if any), without attribution.

        It draws from the same random stream as the organic part of `respond_message` for the same
        recommendation id, so "send" and "send nothing" can be compared on common random numbers.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return self._organic_purchase(visitor_id, now, recommendation_id)

    def respond_message(
        self,
        visitor_id: str,
        message_item_id: str,
        product_id: str | None,
        channel: str,
        sent_at: datetime,
        recommendation_id: str,
    ) -> list[Event]:
        """The visitor's reaction to a message: open, click, purchase, plus any organic purchase.

        A purchase caused by the message echoes `recommendation_id`; an organic one (the visitor would have
        bought anyway) does not, and is replaced by the message purchase when both happen.
        """
        if sent_at.tzinfo is None:
            raise ValueError("sent_at must be timezone-aware")
        row = self._index_of(visitor_id)
        visitor = self.visitors[row]
        p_open, p_click, p_purchase = self.message_probabilities(
            visitor_id, message_item_id, product_id, channel, sent_at
        )
        template = self._item(message_item_id).message
        trigger = template.trigger if template is not None else ""
        rng = self._response_rng("message", visitor_id, recommendation_id, message_item_id)
        organic = self._organic_purchase(visitor_id, sent_at, recommendation_id)
        if rng.random() >= p_open:
            return organic

        properties: dict[str, str | int | float | bool | None] = {"channel": channel, "trigger": trigger}
        if product_id is not None:
            properties["product_id"] = product_id
        message_context = self._response_context(visitor, f"{visitor_id}-{recommendation_id}", channel)
        events: list[Event] = []
        delay = CHANNEL_OPEN_DELAY[channel] * float(rng.lognormal(0.0, 0.8))
        moment = sent_at.astimezone(visitor.zone) + timedelta(seconds=delay)
        events.append(
            Event(
                event_id=self._response_event_id("open", visitor_id, recommendation_id, message_item_id),
                visitor_id=visitor_id,
                type=EventType.MESSAGE_OPEN,
                timestamp=moment,
                item_id=message_item_id,
                recommendation_id=recommendation_id,
                context=message_context,
                properties=properties,
            )
        )
        if rng.random() >= p_click:
            return sorted([*events, *organic], key=lambda event: event.ts)
        moment += timedelta(seconds=10.0 + float(rng.exponential(40.0)))
        events.append(
            Event(
                event_id=self._response_event_id("click", visitor_id, recommendation_id, message_item_id),
                visitor_id=visitor_id,
                type=EventType.MESSAGE_CLICK,
                timestamp=moment,
                item_id=message_item_id,
                recommendation_id=recommendation_id,
                context=message_context,
                properties=properties,
            )
        )
        if rng.random() >= p_purchase:
            return sorted([*events, *organic], key=lambda event: event.ts)
        if product_id is not None and product_id in self._product_index:
            product = self._product_index[product_id]
        else:
            product = self._taste_pick(rng, row)
        item = self._products[product]
        moment += timedelta(seconds=120.0 + float(rng.exponential(600.0)))
        events.append(
            Event(
                event_id=self._response_event_id("purchase", visitor_id, recommendation_id, message_item_id),
                visitor_id=visitor_id,
                type=EventType.PURCHASE,
                timestamp=moment,
                item_id=item.item_id,
                quantity=self._quantity(rng, visitor, item),
                price=item.price,
                recommendation_id=recommendation_id,
                context=self._response_context(visitor, f"{visitor_id}-{recommendation_id}"),
                properties={**properties, "source": "message", "category": item.category},
            )
        )
        # The visitor buys once: a purchase they would have made anyway now comes through the message.
        return sorted(events, key=lambda event: event.ts)

    def respond_visit(
        self, visitor_id: str, after: datetime, within_hours: float, buy_probability: float, key: str
    ) -> list[Event]:
        """A visit the caller decided on (e.g. a CRM campaign in `message_sim.py`): a view of a product
        the visitor likes at a random time in the window, then a purchase of it with `buy_probability`.

        Nothing echoes a recommendation id and no open or click is recorded (mail clients pre-fetch), so the
        outcome is only a visit or a purchase. Reproducible per `key`."""
        if after.tzinfo is None:
            raise ValueError("after must be timezone-aware")
        row = self._index_of(visitor_id)
        visitor = self.visitors[row]
        rng = self._response_rng("visit", visitor_id, key)
        item = self._products[self._taste_pick(rng, row)]
        moment = after.astimezone(visitor.zone) + timedelta(hours=float(rng.uniform(0.0, within_hours * 0.9)))
        context = self._response_context(visitor, f"{visitor_id}-visit-{key}")
        events = [
            Event(
                event_id=self._response_event_id("visit", visitor_id, key),
                visitor_id=visitor_id,
                type=EventType.PRODUCT_VIEW,
                timestamp=moment,
                item_id=item.item_id,
                context=context,
            )
        ]
        if rng.random() < buy_probability:
            events.append(
                Event(
                    event_id=self._response_event_id("visit-purchase", visitor_id, key),
                    visitor_id=visitor_id,
                    type=EventType.PURCHASE,
                    timestamp=moment + timedelta(minutes=float(rng.uniform(2.0, 20.0))),
                    item_id=item.item_id,
                    quantity=self._quantity(rng, visitor, item),
                    price=item.price,
                    context=context,
                    properties={"category": item.category},
                )
            )
        return events
