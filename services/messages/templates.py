"""Message templates and the product lookups the triggers need, built once per item-cache snapshot."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.common.catalog import CatalogItem, ItemKind, Targeting
from services.features.item_cache import ItemSnapshot
from services.messages.settings import CHANNELS


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

    def product_card(self, row: int) -> dict[str, Any]:
        """A product as the answer shows it."""
        snapshot = self.snapshot
        return {
            "item_id": snapshot.ids[row],
            "title": snapshot.titles[row],
            "category": snapshot.categories[row],
            "price": None if math.isnan(self.price[row]) else self.price[row],
            "discount": round(self.discount[row], 4),
            "url": snapshot.urls[row],
            "image_url": snapshot.image_urls[row],
        }
