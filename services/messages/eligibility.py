"""Eligibility: which message templates a visitor qualifies for (trigger rules on the visitor's features and
targeting), and the stock watch that makes a product coming back "back in stock"."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from services.common.context import is_payday_window
from services.features.item_cache import ItemSnapshot
from services.messages.model import VisitorView
from services.messages.repository import MessageRepository
from services.messages.settings import MessageSettings
from services.messages.templates import MessageCatalog, Template

log = logging.getLogger(__name__)


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


def explain(candidates: Sequence[Candidate], scores: Sequence[float], snapshot: ItemSnapshot) -> list[dict[str, Any]]:
    """The eligible messages as an `explain` answer lists them: trigger, product, why, expected uplift."""
    return [
        {
            "item_id": c.template.item_id,
            "trigger": c.template.trigger,
            "product_id": snapshot.ids[c.product] if c.product >= 0 else None,
            "reason": c.reason,
            "score": round(float(score), 6),
        }
        for c, score in zip(candidates, scores, strict=True)
    ]


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
