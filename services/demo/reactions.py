"""The simulator's reactions to what the service shows: clicks on a slot, opens and purchases after a message.

A shown item is clicked with the visitor model's `click_probability` (taste, position, time of day), and a
click may lead to a cart and a purchase that echo the `recommendation_id`. A message is opened, clicked and
converted with `message_probabilities`; a purchase the visitor would have made anyway (`respond_no_message`)
comes from the same stream, so "send" and "send nothing" compare on common random numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from services.common.events import Device, Event, EventContext, EventType
from services.demo.visitor_model import ORGANIC_WINDOW_HOURS, VisitorModel
from services.demo.visitor_types import CHANNEL_OPEN_DELAY, SimVisitor


@dataclass(frozen=True)
class ShownItem:
    """One item the service showed in a slot (position is 0-based: 0 is the first)."""

    item_id: str
    position: int
    kind: str = "product"


def _stable_hash(*parts: object) -> int:
    """A seed from strings that does not change between runs (Python's hash() is salted)."""
    digest = hashlib.blake2b("\x1f".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Reactions:
    """How the visitors of a `VisitorModel` react to what the service shows them and sends them.

    Each reaction draws from a random stream keyed by the seed, the visitor and the recommendation id (or the
    caller's key), so it is reproducible and independent of call order: a simulation can ask in any order and
    get the same answers.
    """

    def __init__(self, model: VisitorModel) -> None:
        self._model = model

    def _response_rng(self, *parts: object) -> np.random.Generator:
        return np.random.default_rng([self._model.seed, 2, _stable_hash(*parts)])

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
        row = self._model.row(visitor_id)
        visitor = self._model.visitors[row]
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

        checkout = self._model.checkout_probability(visitor, local_now)
        for shown_item in sorted(shown, key=lambda entry: entry.position):
            probability = self._model.click_probability(visitor_id, shown_item.item_id, shown_item.position, now)
            if rng.random() >= probability:
                continue
            properties: dict[str, str | int | float | bool | None] = {
                "slot": slot,
                "position": shown_item.position,
                "kind": str(shown_item.kind),
            }
            moment = local_now + timedelta(seconds=2.0 + 3.0 * shown_item.position + float(rng.exponential(8.0)))
            emit(EventType.CLICK, moment, shown_item.item_id, shown_item.position, properties=properties)
            product = self._model.product_index.get(shown_item.item_id)
            if product is None:
                continue
            item = self._model.products[product]
            if rng.random() >= self._model.cart_probability(visitor, row, product, True):
                continue
            moment += timedelta(seconds=20.0 + float(rng.exponential(60.0)))
            quantity = self._model.quantity(rng, visitor, item)
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

    def _organic_purchase(self, visitor_id: str, now: datetime, recommendation_id: str) -> list[Event]:
        row = self._model.row(visitor_id)
        visitor = self._model.visitors[row]
        rng = self._response_rng("organic", visitor_id, recommendation_id)
        if rng.random() >= self._model.organic_purchase_probability(visitor_id, now):
            return []
        product = self._model.taste_pick(rng, row)
        item = self._model.products[product]
        moment = now.astimezone(visitor.zone) + timedelta(hours=float(rng.uniform(0.0, ORGANIC_WINDOW_HOURS)))
        return [
            Event(
                event_id=self._response_event_id("organic", visitor_id, recommendation_id),
                visitor_id=visitor_id,
                type=EventType.PURCHASE,
                timestamp=moment,
                item_id=item.item_id,
                quantity=self._model.quantity(rng, visitor, item),
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
        row = self._model.row(visitor_id)
        visitor = self._model.visitors[row]
        p_open, p_click, p_purchase = self._model.message_probabilities(
            visitor_id, message_item_id, product_id, channel, sent_at
        )
        template = self._model.item(message_item_id).message
        trigger = template.trigger if template is not None else ""
        rng = self._response_rng("message", visitor_id, recommendation_id, message_item_id)
        organic = self._organic_purchase(visitor_id, sent_at, recommendation_id)
        if rng.random() >= p_open:
            return organic

        properties: dict[str, str | int | float | bool | None] = {"channel": channel, "trigger": trigger}
        if product_id is not None:
            properties["product_id"] = product_id
        message_context = self._response_context(visitor, f"{visitor_id}-{recommendation_id}", channel)

        def message_event(kind: str, event_type: EventType, moment: datetime) -> Event:
            return Event(
                event_id=self._response_event_id(kind, visitor_id, recommendation_id, message_item_id),
                visitor_id=visitor_id,
                type=event_type,
                timestamp=moment,
                item_id=message_item_id,
                recommendation_id=recommendation_id,
                context=message_context,
                properties=properties,
            )

        delay = CHANNEL_OPEN_DELAY[channel] * float(rng.lognormal(0.0, 0.8))
        moment = sent_at.astimezone(visitor.zone) + timedelta(seconds=delay)
        events: list[Event] = [message_event("open", EventType.MESSAGE_OPEN, moment)]
        if rng.random() >= p_click:
            return sorted([*events, *organic], key=lambda event: event.ts)
        moment += timedelta(seconds=10.0 + float(rng.exponential(40.0)))
        events.append(message_event("click", EventType.MESSAGE_CLICK, moment))
        if rng.random() >= p_purchase:
            return sorted([*events, *organic], key=lambda event: event.ts)
        if product_id is not None and product_id in self._model.product_index:
            product = self._model.product_index[product_id]
        else:
            product = self._model.taste_pick(rng, row)
        item = self._model.products[product]
        moment += timedelta(seconds=120.0 + float(rng.exponential(600.0)))
        events.append(
            Event(
                event_id=self._response_event_id("purchase", visitor_id, recommendation_id, message_item_id),
                visitor_id=visitor_id,
                type=EventType.PURCHASE,
                timestamp=moment,
                item_id=item.item_id,
                quantity=self._model.quantity(rng, visitor, item),
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
        row = self._model.row(visitor_id)
        visitor = self._model.visitors[row]
        rng = self._response_rng("visit", visitor_id, key)
        item = self._model.products[self._model.taste_pick(rng, row)]
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
                    quantity=self._model.quantity(rng, visitor, item),
                    price=item.price,
                    context=context,
                    properties={"category": item.category},
                )
            )
        return events
