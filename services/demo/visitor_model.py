"""The simulator's visitor model: who the visitors are, what they like and how likely they are to act.

Each visitor belongs to one of five hidden types (`visitor_types.py`) and gets personal tastes sampled
around the type. `VisitorModel` holds those tastes as one utility per visitor and product, and turns them
into the ground-truth probabilities (click, add to cart, check out, open a message, buy without one). It
draws nothing after construction: the two rooms that generate events do, from their own random streams,
and both read the same tastes, so a service that learns them from the history is rewarded with more clicks
and purchases. `history.py` generates the browsing history, `reactions.py` the reactions to what the
service shows; `simulator.py` puts the three together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

import numpy as np

from services.common.catalog import CatalogItem, ItemKind
from services.common.context import is_payday_window
from services.demo.catalogue import CATEGORIES, CATEGORY_BY_SLUG
from services.demo.shop import DemoShop
from services.demo.visitor_types import (
    CHANNEL_OPEN_RATE,
    CITY_REGIONS,
    CITY_WEIGHTS,
    FIRST_NAMES,
    TYPE_PROFILES,
    VISITOR_TYPES,
    SimVisitor,
)

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


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


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


class VisitorModel:
    """Visitors with hidden tastes, sampled once from the seed, and the ground truth of how they behave.

    The arrays are shared, read-only, with the rooms that generate events: a visitor's row is their index in
    `visitors` (`row`), a product's column its index in `products` (`product_index`).
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
        self.products: list[CatalogItem] = list(shop.products)
        self.product_index: dict[str, int] = {item.item_id: index for index, item in enumerate(self.products)}
        self.categories: list[str] = [spec.slug for spec in CATEGORIES]
        category_index = {slug: index for index, slug in enumerate(self.categories)}
        self._brands = sorted({item.brand or "" for item in self.products})
        brand_index = {brand: index for index, brand in enumerate(self._brands)}

        prices = np.array([item.price or 0.0 for item in self.products])
        self._log_price = np.log(np.maximum(prices, 1.0))
        self._discount = np.array([item.discount for item in self.products])
        self._product_category = np.array([category_index[item.category or ""] for item in self.products])
        self._product_brand = np.array([brand_index[item.brand or ""] for item in self.products])
        self.in_stock: np.ndarray = np.array([item.in_stock for item in self.products])
        self.category_members: list[np.ndarray] = [
            np.flatnonzero(self._product_category == index) for index in range(len(self.categories))
        ]
        # What an "ordinary" price is in each category: the target prices are relative to it.
        self._category_log_median = np.array(
            [float(np.median(self._log_price[members])) for members in self.category_members]
        )

        rng = np.random.default_rng([seed, 0])
        self.visitors: list[SimVisitor] = [self._sample_visitor(rng, index) for index in range(n_visitors)]
        self._visitor_index = {visitor.visitor_id: index for index, visitor in enumerate(self.visitors)}
        # Visitors x products, in log-odds units: the one ground truth every probability starts from.
        self.product_utility: np.ndarray = self._utilities()
        # Visitors x categories: the visitors' category preferences as one array for the hot loop of the history
        # (numpy's choice(p=...) is slow for single draws).
        self.category_prefs: np.ndarray = np.array(
            [[visitor.category_prefs[slug] for slug in self.categories] for visitor in self.visitors]
        ).reshape(len(self.visitors), len(self.categories))

    # ----------------------------------------------------------------------------------------- visitors

    def _sample_visitor(self, rng: np.random.Generator, index: int) -> SimVisitor:
        shares = np.array([TYPE_PROFILES[name].share for name in VISITOR_TYPES])
        hidden_type = VISITOR_TYPES[int(rng.choice(len(VISITOR_TYPES), p=shares / shares.sum()))]
        profile = TYPE_PROFILES[hidden_type]

        base = np.array([profile.category_weights.get(slug, profile.other_weight) for slug in self.categories])
        alpha = base / base.sum() * profile.category_concentration + 0.02
        prefs = rng.dirichlet(alpha)
        category_prefs = {slug: float(pref) for slug, pref in zip(self.categories, prefs, strict=True)}

        # Favourite brands in the visitor's top categories; loyal types weigh them heavily.
        brand_prefs: dict[str, float] = {}
        for category in np.argsort(-prefs)[:3]:
            brands = CATEGORY_BY_SLUG[self.categories[int(category)]].brands
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
        n_categories = len(self.categories)
        category_prefs = np.array(
            [[visitor.category_prefs[slug] for slug in self.categories] for visitor in self.visitors]
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
        return self.visitors[self.row(visitor_id)]

    def row(self, visitor_id: str) -> int:
        """The visitor's row in the model's arrays (their index in `visitors`)."""
        try:
            return self._visitor_index[visitor_id]
        except KeyError:
            raise KeyError(f"unknown visitor {visitor_id!r}") from None

    def item(self, item_id: str) -> CatalogItem:
        try:
            return self._items[item_id]
        except KeyError:
            raise KeyError(f"item {item_id!r} is not in the demo shop") from None

    def utilities(self, visitor_id: str) -> np.ndarray:
        """The visitor's hidden utility for every product, aligned with `shop.products` (a copy)."""
        return np.array(self.product_utility[self.row(visitor_id)], dtype=np.float64)

    def utility(self, visitor_id: str, item_id: str, now: datetime | None = None) -> float:
        """How much the visitor likes the item, in log-odds units (0 is neutral)."""
        row = self.row(visitor_id)
        item = self.item(item_id)
        if item.kind is ItemKind.PRODUCT:
            return float(self.product_utility[row, self.product_index[item_id]])
        return self._creative_utility(self.visitors[row], item, now)

    def _creative_utility(self, visitor: SimVisitor, item: CatalogItem, now: datetime | None) -> float:
        """Banners, CTAs and messages: the categories they are about, their tags and their targeting."""
        profile = TYPE_PROFILES[visitor.hidden_type]
        targeting = item.targeting
        utility = 0.0
        if targeting.categories:
            share = sum(visitor.category_prefs.get(slug, 0.0) for slug in targeting.categories)
            utility += float(np.clip(math.log(share / len(targeting.categories) * len(self.categories)), -3, 2))
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
        visitor = self.visitors[self.row(visitor_id)]
        item = self.item(item_id)
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

    def cart_probability(self, visitor: SimVisitor, row: int, product: int, after_click: bool) -> float:
        """Chance the visitor puts the product (a column) in the cart after viewing or clicking it."""
        if not self.in_stock[product]:
            return 0.0
        profile = TYPE_PROFILES[visitor.hidden_type]
        appeal = 0.5 + _sigmoid(float(self.product_utility[row, product]))  # 0.5 .. 1.5
        # A click on a recommendation is a stronger signal of intent than a browsing view.
        rate = profile.cart_rate * appeal * (2.0 if after_click else 1.0)
        return min(MAX_PROBABILITY, rate)

    def checkout_probability(self, visitor: SimVisitor, local: datetime) -> float:
        """Chance a visitor with a full cart checks out at the local time `local` (paydays change it)."""
        profile = TYPE_PROFILES[visitor.hidden_type]
        factor = profile.payday_checkout_factor if is_payday_window(local.day) else profile.off_payday_checkout_factor
        return min(MAX_PROBABILITY, profile.checkout_rate * factor)

    def _day(self, moment: datetime) -> float:
        return (moment - self.start).total_seconds() / DAY_SECONDS

    def organic_purchase_probability(self, visitor_id: str, now: datetime) -> float:
        """Ground truth: chance the visitor buys within ORGANIC_WINDOW_HOURS after `now` with no message."""
        visitor = self.visitors[self.row(visitor_id)]
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
        visitor = self.visitors[self.row(visitor_id)]
        profile = TYPE_PROFILES[visitor.hidden_type]
        template = self.item(message_item_id).message
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

    # ------------------------------------------------------------------------- draws shared by the rooms

    def quantity(self, rng: np.random.Generator, visitor: SimVisitor, item: CatalogItem) -> int:
        """How many of the item the visitor puts in the cart, drawn from the caller's stream."""
        spec = CATEGORY_BY_SLUG.get(item.category or "")
        if spec is not None and spec.consumable:
            # Groceries go in by the handful; deal hunters stock up.
            extra = 1.5 if visitor.hidden_type == "deal_hunter" else 0.6
            return 1 + int(rng.poisson(extra))
        return 2 if rng.random() < 0.05 else 1

    def taste_pick(self, rng: np.random.Generator, row: int) -> int:
        """A product (a column) the visitor would buy on their own: category by preference, then by taste, in
        stock; drawn from the caller's stream."""
        prefs = self.category_prefs[row] / self.category_prefs[row].sum()
        for _ in range(8):
            category = int(rng.choice(len(self.categories), p=prefs))
            members = self.category_members[category]
            weights = np.exp(self.product_utility[row, members].astype(np.float64)) * self.in_stock[members]
            if weights.sum() > 0:
                return int(members[int(rng.choice(len(members), p=weights / weights.sum()))])
        return int(np.argmax(self.product_utility[row] + np.where(self.in_stock, 0.0, -1e9)))
