"""The simulator's browsing history: the sessions visitors of the visitor model have on their own.

A visitor comes back at a rate set by their type (more at weekends and paydays, hardly at all once dormant),
at the local hours they shop, and in each session looks at a home page, a search or a category, views
products drawn by their taste, fills and empties a cart and sometimes checks out. Everything is drawn from
one stream keyed by the seed, so the same model yields the same events on every call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

import numpy as np

from services.common.context import is_payday_window
from services.common.events import Device, Event, EventContext, EventType
from services.demo.catalogue import CATEGORIES
from services.demo.visitor_model import VisitorModel
from services.demo.visitor_types import TYPE_PROFILES, SimVisitor, TypeProfile


@dataclass
class _VisitorState:
    """What the history has to remember about a visitor between sessions."""

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


def _cdf(weights: Sequence[float]) -> np.ndarray:
    cumulative: np.ndarray = np.cumsum(np.asarray(weights, dtype=float))
    return cumulative / cumulative[-1]


def _draw(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """One index drawn from a normalised cumulative distribution."""
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


class HistoryGenerator:
    """The visitors' own sessions in the demo shop, generated from the tastes of a `VisitorModel`."""

    def __init__(self, model: VisitorModel) -> None:
        self._model = model
        visitors = model.visitors
        # Cumulative distributions for the hot loop (numpy's choice(p=...) is slow for single draws).
        self._hour_cdf = np.cumsum(
            np.array([visitor.hour_weights for visitor in visitors]).reshape(len(visitors), 24), axis=1
        )
        self._referrers = {
            name: (list(profile.referrers), _cdf(list(profile.referrers.values())))
            for name, profile in TYPE_PROFILES.items()
        }
        self._created_ts = np.array(
            [item.created_at.timestamp() if item.created_at else -math.inf for item in model.products]
        )

    def history(self, days: int) -> Iterator[Event]:
        """Time-ordered behaviour events of all visitors over `days` days after the model's `start`.

        Sessions start inside [start, start + days) at the visitor's active local hours; a session's last
        events can end a few minutes after the window.
        """
        if days < 0:
            raise ValueError("days cannot be negative")
        model = self._model
        rng = np.random.default_rng([model.seed, 1])
        states = [_VisitorState() for _ in model.visitors]
        cdf_cache: dict[tuple[int, int], np.ndarray] = {}
        end = model.start + timedelta(days=days)
        zones = sorted({visitor.zone for visitor in model.visitors}, key=lambda zone: str(zone))
        buffer: list[tuple[float, int, Event]] = []
        sequence = 0
        for day in range(days + 1):
            for row, visitor in enumerate(model.visitors):
                day_start = self._local_midnight(visitor.zone, day)
                for session_start in self._session_starts(rng, row, visitor, day, day_start):
                    if not model.start <= session_start < end:
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
        local_date: date = (self._model.start + timedelta(days=day)).astimezone(zone).date()
        return datetime(local_date.year, local_date.month, local_date.day, tzinfo=zone)

    def _session_starts(
        self, rng: np.random.Generator, row: int, visitor: SimVisitor, day: int, day_start: datetime
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
        members = self._model.category_members[category]
        if cdf is None:
            weights = np.exp(self._model.product_utility[row, members].astype(np.float64))
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
        model = self._model
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
        session = _Session(visitor, state, context, local, model.seed)

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
        keys = np.log(rng.random(len(model.categories))) / np.maximum(model.category_prefs[row], 1e-12)
        focus = np.argsort(-keys)[: profile.session_categories]

        if rng.random() < profile.search_rate:
            advance(0.5)
            query = self._query(rng, profile, int(focus[0]))
            session.emit(EventType.SEARCH, query=query, properties={"results": int(rng.integers(12, 400))})
        else:
            advance(0.5)
            slug = model.categories[int(focus[0])]
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
            item = model.products[product]
            session.emit(
                EventType.PRODUCT_VIEW,
                item_id=item.item_id,
                price=item.price,
                properties={"category": item.category, "brand": item.brand, "discounted": item.discount > 0},
            )
            if product not in state.cart and rng.random() < model.cart_probability(visitor, row, product, False):
                advance(0.3)
                quantity = model.quantity(rng, visitor, item)
                state.cart[product] = quantity
                session.emit(EventType.ADD_TO_CART, item_id=item.item_id, quantity=quantity, price=item.price)

        if state.cart and rng.random() < profile.remove_rate:
            advance(0.5)
            removed = list(state.cart)[int(rng.integers(len(state.cart)))]
            quantity = state.cart.pop(removed)
            item = model.products[removed]
            session.emit(EventType.REMOVE_FROM_CART, item_id=item.item_id, quantity=quantity, price=item.price)

        if state.cart and rng.random() < model.checkout_probability(visitor, local):
            advance()
            session.emit(EventType.PAGE_VIEW, properties={"page": "checkout"})
            advance(2.0)
            order_id = f"o{model.seed}-{visitor.visitor_id}-{state.sessions:04d}"
            for product, quantity in sorted(state.cart.items()):
                item = model.products[product]
                session.emit(
                    EventType.PURCHASE,
                    item_id=item.item_id,
                    quantity=quantity,
                    price=item.price,
                    properties={"order_id": order_id, "category": item.category},
                )
            state.cart.clear()
        return session.events

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
