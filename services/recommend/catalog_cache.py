"""The in-process, columnar item cache: catalog attributes, item statistics and candidate indexes as numpy
arrays, rebuilt in the background and swapped atomically. Requests never fetch item features from Feast."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.common import features as F
from services.common.catalog import CatalogItem, ItemKind, Targeting
from services.common.indexes import GLOBAL_CONTEXT

KIND_CODES = {ItemKind.PRODUCT: 0, ItemKind.BANNER: 1, ItemKind.CTA: 2, ItemKind.MESSAGE: 3}
NEW_ARRIVAL_DAYS = 14.0
LOW_STOCK = 5
STAT_COLUMNS = tuple(name for name, kind in F.ITEM_FEATURES.items() if kind in ("int", "float"))
# Attributes kept for the response and for rules; full catalog objects only for the few non-products.
IntArray = np.ndarray
FloatArray = np.ndarray


def category_code(category: str | None) -> int:
    """A stable small integer per category name (LightGBM categorical); 0 = none."""
    if not category:
        return 0
    return 1 + zlib.crc32(category.encode()) % 997


@dataclass(frozen=True)
class ItemColumns:
    """Item-side values for the rows of a feature matrix (one row per candidate)."""

    item_ids: Sequence[str]
    categories: Sequence[str | None]
    brands: Sequence[str | None]
    category_code: IntArray
    log_price: FloatArray
    price: FloatArray
    discount: FloatArray
    age_days: FloatArray
    low_stock: FloatArray
    stats: Mapping[str, FloatArray]
    slot_ctr: FloatArray


@dataclass
class ItemSnapshot:
    """Immutable once built; the refresher builds a new one and swaps the reference."""

    ids: list[str]
    index: dict[str, int]
    kind: IntArray
    titles: list[str]
    categories: list[str | None]
    brands: list[str | None]
    category_code: IntArray
    price: FloatArray
    log_price: FloatArray
    discount: FloatArray
    created_ts: FloatArray
    stock: FloatArray
    available: np.ndarray  # active and in stock
    pinned: np.ndarray
    log_boost: FloatArray
    urls: list[str | None]
    image_urls: list[str | None]
    stats: dict[str, FloatArray]
    slot_ctr: dict[str, FloatArray]
    by_kind: dict[int, IntArray]
    by_category: dict[str, IntArray]
    by_brand: dict[str, IntArray]
    new_arrivals: IntArray
    popular: IntArray
    covisitation: dict[str, tuple[IntArray, FloatArray]]
    popularity: dict[str, tuple[IntArray, FloatArray]]
    targeting: dict[int, Targeting]
    objects: dict[int, CatalogItem]  # banners, CTAs and messages (few): kept whole for rendering
    built_at: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return len(self.ids)

    def columns(self, idx: IntArray, slot: str, now: float) -> ItemColumns:
        slot_ctr = self.slot_ctr.get(slot)
        return ItemColumns(
            item_ids=[self.ids[i] for i in idx],
            categories=[self.categories[i] for i in idx],
            brands=[self.brands[i] for i in idx],
            category_code=self.category_code[idx],
            log_price=self.log_price[idx],
            price=self.price[idx],
            discount=self.discount[idx],
            age_days=(now - self.created_ts[idx]) / 86400.0,
            low_stock=((self.stock[idx] >= 0) & (self.stock[idx] <= LOW_STOCK)).astype(np.float32),
            stats={name: values[idx] for name, values in self.stats.items()},
            slot_ctr=slot_ctr[idx] if slot_ctr is not None else self.stats["ctr_7d"][idx],
        )


def _order_by(values: FloatArray, idx: IntArray) -> IntArray:
    return idx[np.argsort(-values[idx], kind="stable")] if len(idx) else idx


def build_snapshot(
    items: Iterable[CatalogItem],
    stats_rows: Mapping[str, Mapping[str, Any]],
    covisitation: Mapping[str, Sequence[Sequence[Any]]],
    popularity: Mapping[str, Mapping[str, Sequence[float]]],
    now: float | None = None,
) -> ItemSnapshot:
    """Columnar snapshot of the catalog plus statistics and indexes (rows of inactive items are kept so
    ids stay resolvable; `available` excludes them from serving)."""
    now = now or time.time()
    catalog = list(items)
    n = len(catalog)
    ids = [item.item_id for item in catalog]
    index = {item_id: i for i, item_id in enumerate(ids)}
    price = np.array([item.price if item.price is not None else np.nan for item in catalog], dtype=np.float64)
    stock = np.array([item.stock if item.stock is not None else -1 for item in catalog], dtype=np.float64)
    created = np.array(
        [item.created_at.timestamp() if item.created_at else now - 365 * 86400.0 for item in catalog],
        dtype=np.float64,
    )
    kind = np.array([KIND_CODES[item.kind] for item in catalog], dtype=np.int8)
    available = np.array([item.active and item.in_stock for item in catalog], dtype=bool)

    stats: dict[str, FloatArray] = {name: np.full(n, np.nan, dtype=np.float64) for name in STAT_COLUMNS}
    slot_ctr: dict[str, FloatArray] = {}
    for item_id, row in stats_rows.items():
        i = index.get(item_id)
        if i is None:
            continue
        for name in STAT_COLUMNS:
            value = row.get(name)
            if value is not None:
                stats[name][i] = float(value)
        for slot, ctr in zip(row.get("slot_names") or [], row.get("slot_ctr_7d") or [], strict=False):
            slot_ctr.setdefault(slot, np.full(n, np.nan, dtype=np.float64))[i] = ctr

    categories = [item.category for item in catalog]
    brands = [item.brand for item in catalog]
    by_kind = {code: np.flatnonzero((kind == code) & available) for code in KIND_CODES.values()}
    product_idx = by_kind[KIND_CODES[ItemKind.PRODUCT]]

    popularity_arrays: dict[str, tuple[IntArray, FloatArray]] = {}
    for key, row in popularity.items():
        pairs = [(index[item_id], _decayed(entry, now)) for item_id, entry in row.items() if item_id in index]
        pairs.sort(key=lambda p: -p[1])
        popularity_arrays[key] = (
            np.array([p[0] for p in pairs], dtype=np.int64),
            np.array([p[1] for p in pairs], dtype=np.float64),
        )
    # Global popularity orders category/brand/new-arrival lists, so "the best of a category" comes first.
    popularity_score = np.zeros(n, dtype=np.float64)
    if GLOBAL_CONTEXT in popularity_arrays:
        idx, scores = popularity_arrays[GLOBAL_CONTEXT]
        popularity_score[idx] = scores
    popularity_score += np.nan_to_num(stats["views_7d"], nan=0.0) * 1e-6  # tie-break by item stats

    by_category: dict[str, list[int]] = {}
    by_brand: dict[str, list[int]] = {}
    for i in product_idx:
        if categories[i]:
            by_category.setdefault(categories[i], []).append(int(i))  # type: ignore[arg-type]
        if brands[i]:
            by_brand.setdefault(brands[i], []).append(int(i))  # type: ignore[arg-type]
    new_idx = product_idx[(now - created[product_idx]) <= NEW_ARRIVAL_DAYS * 86400.0]

    covis_arrays: dict[str, tuple[IntArray, FloatArray]] = {}
    for item_id, neighbours in covisitation.items():
        pairs = [(index[other], float(score)) for other, score in neighbours if other in index]
        if pairs:
            covis_arrays[item_id] = (
                np.array([p[0] for p in pairs], dtype=np.int64),
                np.array([p[1] for p in pairs], dtype=np.float64),
            )

    non_products = {i: item for i, item in enumerate(catalog) if item.kind is not ItemKind.PRODUCT}
    return ItemSnapshot(
        ids=ids,
        index=index,
        kind=kind,
        titles=[item.title for item in catalog],
        categories=categories,
        brands=brands,
        category_code=np.array([category_code(c) for c in categories], dtype=np.int64),
        price=price,
        log_price=np.log1p(price),
        discount=np.array([item.discount for item in catalog], dtype=np.float64),
        created_ts=created,
        stock=stock,
        available=available,
        pinned=np.array([item.pinned for item in catalog], dtype=bool),
        log_boost=np.log(np.array([max(item.boost, 1e-6) for item in catalog], dtype=np.float64)),
        urls=[item.url for item in catalog],
        image_urls=[item.image_url for item in catalog],
        stats=stats,
        slot_ctr=slot_ctr,
        by_kind=by_kind,
        by_category={c: _order_by(popularity_score, np.array(v, dtype=np.int64)) for c, v in by_category.items()},
        by_brand={b: _order_by(popularity_score, np.array(v, dtype=np.int64)) for b, v in by_brand.items()},
        new_arrivals=_order_by(popularity_score, new_idx.astype(np.int64)),
        popular=_order_by(popularity_score, product_idx.astype(np.int64)),
        covisitation=covis_arrays,
        popularity=popularity_arrays,
        targeting={i: item.targeting for i, item in non_products.items()},
        objects=non_products,
        built_at=time.time(),
    )


def _decayed(entry: Sequence[float], now: float) -> float:
    from services.common.indexes import POPULARITY_HALF_LIFE_S

    score, last = float(entry[0]), float(entry[1])
    return score * math.pow(0.5, max(now - last, 0.0) / POPULARITY_HALF_LIFE_S)
