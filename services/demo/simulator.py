"""Simulated shop visitors with hidden tastes: browsing history, reactions to recommendations and messages.

Each visitor belongs to one of five hidden types and gets personal tastes sampled around the type. The
same taste (`Simulator.utility`) drives what they browse in `history`, what they click in `respond` and
what they buy after a message in `respond_message`, so a service that learns the tastes from the history
is rewarded with more clicks and purchases: that is what makes the simulator useful for evaluation.

The simulator is three rooms behind one object: `visitor_model.py` (the visitors, their tastes and the
ground-truth probabilities), `history.py` (the sessions they have on their own) and `reactions.py` (what
they do with what the service shows them). The demo, the simulations, tests and benchmarks use `Simulator`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

from services.common.events import Event
from services.demo.history import HistoryGenerator
from services.demo.reactions import Reactions, ShownItem
from services.demo.shop import DemoShop
from services.demo.visitor_model import VisitorModel


class Simulator(VisitorModel):
    """Visitors with hidden tastes who browse the demo shop and react to what the service shows them.

    `history` is reproducible (same seed, same events, on every call). `respond` and `respond_message` draw
    from a random stream keyed by seed, visitor and recommendation id, so they are reproducible too and
    independent of call order.
    """

    def __init__(self, shop: DemoShop, n_visitors: int = 1000, seed: int = 7, start: datetime | None = None) -> None:
        super().__init__(shop, n_visitors=n_visitors, seed=seed, start=start)
        self._history = HistoryGenerator(self)
        self._reactions = Reactions(self)

    def history(self, days: int) -> Iterator[Event]:
        """Time-ordered behaviour events of all visitors over `days` days after `start` (`HistoryGenerator`)."""
        return self._history.history(days)

    def respond(
        self,
        visitor_id: str,
        shown: Sequence[ShownItem],
        now: datetime,
        recommendation_id: str,
        slot: str,
    ) -> list[Event]:
        """The visitor's reaction to a slot: clicks, then add-to-cart and purchase (`Reactions.respond`)."""
        return self._reactions.respond(visitor_id, shown, now, recommendation_id, slot)

    def respond_no_message(self, visitor_id: str, now: datetime, recommendation_id: str) -> list[Event]:
        """What happens when nothing is sent: only the organic purchase, if any (`Reactions.respond_no_message`)."""
        return self._reactions.respond_no_message(visitor_id, now, recommendation_id)

    def respond_message(
        self,
        visitor_id: str,
        message_item_id: str,
        product_id: str | None,
        channel: str,
        sent_at: datetime,
        recommendation_id: str,
    ) -> list[Event]:
        """The visitor's reaction to a message: open, click, purchase, plus any organic purchase
        (`Reactions.respond_message`)."""
        return self._reactions.respond_message(
            visitor_id, message_item_id, product_id, channel, sent_at, recommendation_id
        )

    def respond_visit(
        self, visitor_id: str, after: datetime, within_hours: float, buy_probability: float, key: str
    ) -> list[Event]:
        """A visit the caller decided on: a view of a liked product, then maybe a purchase
        (`Reactions.respond_visit`)."""
        return self._reactions.respond_visit(visitor_id, after, within_hours, buy_probability, key)
