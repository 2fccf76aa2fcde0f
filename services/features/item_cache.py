"""The in-process, columnar item cache: catalog attributes, item statistics and candidate indexes as numpy
arrays, rebuilt in the background and swapped atomically. Requests never fetch item features from Feast."""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np
import orjson

from services.common.catalog import CatalogItem, ItemKind, Targeting
from services.common.clock import wall_time
from services.features import schema as F
from services.features.indexes import GLOBAL_CONTEXT, POPULARITY_HALF_LIFE_S

KIND_CODES = {ItemKind.PRODUCT: 0, ItemKind.BANNER: 1, ItemKind.CTA: 2, ItemKind.MESSAGE: 3}
NEW_ARRIVAL_DAYS = 14.0
LOW_STOCK = 5
STAT_COLUMNS = tuple(name for name, kind in F.ITEM_FEATURES.items() if kind in ("int", "float"))
# Attributes kept for the response and for rules; full catalog objects only for the few non-products.
IntArray = np.ndarray
FloatArray = np.ndarray


CATEGORY_CODES = 998  # codes 0..997
# The ranker's item columns that depend on the item alone (not on the time of the request or the slot), in
# this order in `ItemSnapshot.item_block` and `ItemColumns.static`.
ITEM_STATS = ("views_24h", "views_7d", "carts_7d", "purchases_7d", "ctr_7d", "conversion_7d", "trend_score")
ITEM_BLOCK = (
    "i_log_price",
    "i_discount",
    "i_low_stock",
    *(f"i_{name}" for name in ITEM_STATS),
    "i_category_code",
    "i_popularity",
)
# A tag carried by more than this share of the products says little about an item ("sale", a root category):
# only rarer tags make items neighbours. Each tag's item list is capped (most popular first).
SPECIFIC_TAG_SHARE = 0.05
TAG_LIST_CAP = 300


def category_code(category: str | None) -> int:
    """A stable small integer per category name (LightGBM categorical); 0 = none."""
    if not category:
        return 0
    return 1 + zlib.crc32(category.encode()) % (CATEGORY_CODES - 1)


@dataclass(frozen=True)
class ItemColumns:
    """Item-side values for the rows of a feature matrix (one row per candidate). `rows` are snapshot rows;
    `index` and `brand_index` are the snapshot's (shared, not copied) lookups for visitor crosses. `static`:
    the rows' `ITEM_BLOCK` columns, one row per candidate."""

    rows: IntArray
    index: Mapping[str, int]
    brand_index: Mapping[str, int]
    brand_code: IntArray
    category_code: IntArray
    price: FloatArray
    static: FloatArray
    age_days: FloatArray
    slot_ctr: FloatArray


@dataclass(frozen=True)
class CatalogArrays:
    """The static, catalog-only part of a snapshot (rebuilt only when the catalog is reloaded)."""

    ids: list[str]
    index: dict[str, int]
    kind: IntArray
    titles: list[str]
    categories: list[str | None]
    brands: list[str | None]
    category_code: IntArray
    brand_index: dict[str, int]
    brand_code: IntArray
    price: FloatArray
    discount: FloatArray
    created_ts: FloatArray
    stock: FloatArray
    available: np.ndarray
    pinned: np.ndarray
    log_boost: FloatArray
    urls: list[str | None]
    image_urls: list[str | None]
    by_kind: dict[int, IntArray]
    by_category: dict[str, IntArray]
    by_brand: dict[str, IntArray]
    tags: list[tuple[str, ...]]
    by_tag: dict[str, IntArray]
    tag_weight: dict[str, float]  # specific tags only (see SPECIFIC_TAG_SHARE), weighted by rarity
    targeting: dict[int, Targeting]
    objects: dict[int, CatalogItem]

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ItemSnapshot(CatalogArrays):
    """Catalog arrays plus item statistics and candidate indexes. Immutable once built: the refresher builds a
    new one and swaps the reference. `by_category`/`by_brand` are ordered by popularity here."""

    log_price: FloatArray
    stats: dict[str, FloatArray]
    slot_ctr: dict[str, FloatArray]
    new_arrivals: IntArray
    popular: IntArray
    popularity_score: FloatArray
    covisitation: Mapping[str, tuple[IntArray, FloatArray]]
    popularity: Mapping[str, tuple[IntArray, FloatArray]]
    built_at: float = field(default_factory=wall_time)  # infrastructure: the cache-age metric

    @cached_property
    def item_block(self) -> FloatArray:
        """The `ITEM_BLOCK` columns of every row (rows x columns), built on first use: a request gathers its
        candidates' rows in one indexing instead of a dozen columns one by one."""
        low_stock = ((self.stock >= 0) & (self.stock <= LOW_STOCK)).astype(np.float32)
        columns = [
            self.log_price,
            self.discount,
            low_stock,
            *(self.stats[name] for name in ITEM_STATS),
            self.category_code,
            np.log1p(self.popularity_score),
        ]
        block = np.empty((self.size, len(ITEM_BLOCK)), dtype=np.float64)
        for j, values in enumerate(columns):
            block[:, j] = values
        return block

    def columns(self, idx: IntArray, slot: str, now: float) -> ItemColumns:
        slot_ctr = self.slot_ctr.get(slot)
        return ItemColumns(
            rows=idx,
            index=self.index,
            brand_index=self.brand_index,
            brand_code=self.brand_code[idx],
            category_code=self.category_code[idx],
            price=self.price[idx],
            static=self.item_block[idx],
            age_days=(now - self.created_ts[idx]) / 86400.0,
            slot_ctr=slot_ctr[idx] if slot_ctr is not None else self.stats["ctr_7d"][idx],
        )


def _order_by(values: FloatArray, idx: IntArray) -> IntArray:
    return idx[np.argsort(-values[idx], kind="stable")] if len(idx) else idx


def catalog_arrays(items: Iterable[CatalogItem]) -> CatalogArrays:
    """One pass over the items, keeping only columns: a 100,000-item catalog is never held as model objects
    (the list of parsed items cost ~350 MB per worker, memory the allocator then kept). An item without
    `created_at` has an unknown age (NaN): never a new arrival, and the ranker sees a missing value."""
    ids: list[str] = []
    kinds: list[int] = []
    available_flags: list[bool] = []
    titles: list[str] = []
    categories: list[str | None] = []
    brands: list[str | None] = []
    prices: list[float] = []
    discounts: list[float] = []
    created: list[float] = []
    stocks: list[float] = []
    pins: list[bool] = []
    boosts: list[float] = []
    urls: list[str | None] = []
    image_urls: list[str | None] = []
    tags: list[tuple[str, ...]] = []
    non_products: dict[int, CatalogItem] = {}
    for i, item in enumerate(items):
        ids.append(item.item_id)
        kinds.append(KIND_CODES[item.kind])
        available_flags.append(item.active and item.in_stock)
        titles.append(item.title)
        # Interned: thousands of items share a category or brand, one string object each is enough.
        categories.append(sys.intern(item.category) if item.category else item.category)
        brands.append(sys.intern(item.brand) if item.brand else item.brand)
        prices.append(item.price if item.price is not None else np.nan)
        discounts.append(item.discount)
        created.append(item.created_at.timestamp() if item.created_at else np.nan)
        stocks.append(item.stock if item.stock is not None else -1)
        pins.append(item.pinned)
        boosts.append(max(item.boost, 1e-6))
        urls.append(item.url)
        image_urls.append(item.image_url)
        tags.append(tuple(sys.intern(t) for t in item.tags))
        if item.kind is not ItemKind.PRODUCT:
            non_products[i] = item
    kind = np.array(kinds, dtype=np.int8)
    available = np.array(available_flags, dtype=bool)
    by_kind = {code: np.flatnonzero((kind == code) & available) for code in KIND_CODES.values()}
    by_category: dict[str, list[int]] = {}
    by_brand: dict[str, list[int]] = {}
    by_tag: dict[str, list[int]] = {}
    product_rows = by_kind[KIND_CODES[ItemKind.PRODUCT]].tolist()
    for row in product_rows:
        category, brand = categories[row], brands[row]
        if category:
            by_category.setdefault(category, []).append(row)
        if brand:
            by_brand.setdefault(brand, []).append(row)
        for tag in tags[row]:
            by_tag.setdefault(tag, []).append(row)
    specific = max(SPECIFIC_TAG_SHARE * len(product_rows), 2.0)
    tag_weight = {
        tag: math.log((len(product_rows) + 1) / (len(rows) + 1))
        for tag, rows in by_tag.items()
        if len(rows) <= specific
    }
    brand_index = {brand: code for code, brand in enumerate(sorted({b for b in brands if b}), start=1)}
    return CatalogArrays(
        ids=ids,
        index={item_id: i for i, item_id in enumerate(ids)},
        kind=kind,
        titles=titles,
        categories=categories,
        brands=brands,
        category_code=np.array([category_code(c) for c in categories], dtype=np.int64),
        brand_index=brand_index,
        brand_code=np.array([brand_index.get(b or "", 0) for b in brands], dtype=np.int64),
        price=np.array(prices, dtype=np.float64),
        discount=np.array(discounts, dtype=np.float64),
        created_ts=np.array(created, dtype=np.float64),
        stock=np.array(stocks, dtype=np.float64),
        available=available,
        pinned=np.array(pins, dtype=bool),
        log_boost=np.log(np.array(boosts, dtype=np.float64)),
        urls=urls,
        image_urls=image_urls,
        by_kind=by_kind,
        by_category={c: np.array(v, dtype=np.int64) for c, v in by_category.items()},
        by_brand={b: np.array(v, dtype=np.int64) for b, v in by_brand.items()},
        tags=tags,
        by_tag={t: np.array(by_tag[t], dtype=np.int64) for t in tag_weight},
        tag_weight=tag_weight,
        targeting={i: item.targeting for i, item in non_products.items()},
        objects=non_products,
    )


def stats_columns(arrays: CatalogArrays, stats_rows: Mapping[str, Mapping[str, Any]]) -> dict[str, FloatArray]:
    """Item statistics rows (item id -> feature dict) as columns aligned with the catalog; NaN = unknown."""
    n = arrays.size
    columns: dict[str, FloatArray] = {name: np.full(n, np.nan, dtype=np.float64) for name in STAT_COLUMNS}
    for item_id, row in stats_rows.items():
        i = arrays.index.get(item_id)
        if i is None:
            continue
        for name in STAT_COLUMNS:
            value = row.get(name)
            if value is not None:
                columns[name][i] = float(value)
        for slot, ctr in zip(row.get("slot_names") or [], row.get("slot_ctr_7d") or [], strict=False):
            columns.setdefault(f"slot:{slot}", np.full(n, np.nan, dtype=np.float64))[i] = ctr
    return columns


class NeighbourArrays(Mapping[str, tuple[IntArray, FloatArray]]):
    """Co-visitation lists converted to snapshot rows on first access (most items are never asked for), scores
    divided by the square root of the listed total.

    `raw` values may be the stored JSON bytes: parsed only when asked for, and bytes are invisible to the
    cyclic GC, whose full passes over millions of small decoded lists were a source of p99 pauses."""

    def __init__(
        self, raw: Mapping[str, Sequence[Sequence[Any]] | bytes], index: Mapping[str, int], cache: bool = True
    ):
        self.raw = raw
        self.index = index
        self.cache: dict[str, tuple[IntArray, FloatArray]] | None = {} if cache else None

    def __getitem__(self, item_id: str) -> tuple[IntArray, FloatArray]:
        if self.cache is not None and item_id in self.cache:
            return self.cache[item_id]
        neighbours = self.raw[item_id]
        if isinstance(neighbours, bytes):
            neighbours = orjson.loads(neighbours)
        index = self.index
        rows = [(index[other], float(score)) for other, score in neighbours if other in index]
        scores = np.array([r[1] for r in rows], dtype=np.float64)
        # Rows damped by the square root of their total: a hub item followed by everything says less about
        # any one follower than a niche item followed by two.
        total = float(scores.sum())
        value = (np.array([r[0] for r in rows], dtype=np.int64), scores / math.sqrt(total) if total > 0 else scores)
        if self.cache is not None:
            self.cache[item_id] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


class PopularityArrays(Mapping[str, tuple[IntArray, FloatArray]]):
    """Per context key: item rows by decayed score, highest first; computed on first access (few keys are
    asked for per request, while a shop has one per city × part of day).

    Scores are decayed to the newest entry of the row, not to the clock: decaying every entry by the same
    further time does not change their order, while history far older than the clock (an imported year,
    a quiet context) would underflow to 0 and lose its order altogether."""

    def __init__(self, raw: Mapping[str, Mapping[str, Sequence[float]] | bytes], index: Mapping[str, int]):
        self.raw = raw
        self.index = index
        self.cache: dict[str, tuple[IntArray, FloatArray]] = {}

    def __getitem__(self, key: str) -> tuple[IntArray, FloatArray]:
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        row = self.raw[key]
        if isinstance(row, bytes):
            row = orjson.loads(row)
        index = self.index
        known = [(index[item_id], entry[0], entry[1]) for item_id, entry in row.items() if item_id in index]
        value: tuple[IntArray, FloatArray] = (np.zeros(0, dtype=np.int64), np.zeros(0))
        if known:
            table = np.array(known, dtype=np.float64)
            rate = math.log(0.5) / POPULARITY_HALF_LIFE_S
            scores = table[:, 1] * np.exp(rate * (table[:, 2].max() - table[:, 2]))
            order = np.argsort(-scores, kind="stable")
            value = (table[order, 0].astype(np.int64), scores[order])
        self.cache[key] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def build_snapshot(
    items: Iterable[CatalogItem] | CatalogArrays,
    stats: Mapping[str, Mapping[str, Any]] | Mapping[str, FloatArray],
    covisitation: Mapping[str, Sequence[Sequence[Any]] | bytes],
    popularity: Mapping[str, Mapping[str, Sequence[float]] | bytes],
    now: float,
    cache_neighbours: bool = True,
) -> ItemSnapshot:
    """Columnar snapshot of the catalog plus statistics and indexes (rows of inactive items are kept so
    ids stay resolvable; `available` excludes them from serving). `stats` is either rows per item id or
    columns aligned with the catalog (see `stats_columns`). `now` is business time (what is a new arrival)."""
    arrays = items if isinstance(items, CatalogArrays) else catalog_arrays(items)
    n = arrays.size
    first = next(iter(stats.values()), None)
    columns: Mapping[str, FloatArray] = (
        stats  # type: ignore[assignment]
        if isinstance(first, np.ndarray)
        else stats_columns(arrays, stats)  # type: ignore[arg-type]
    )
    stat_values = {name: columns.get(name, np.full(n, np.nan)) for name in STAT_COLUMNS}
    slot_ctr = {name[5:]: values for name, values in columns.items() if name.startswith("slot:")}

    pop = PopularityArrays(popularity, arrays.index)
    # Global popularity orders category/brand/new-arrival lists, so "the best of a category" comes first.
    popularity_score = np.zeros(n, dtype=np.float64)
    if GLOBAL_CONTEXT in pop:
        idx, scores = pop[GLOBAL_CONTEXT]
        popularity_score[idx] = scores
    popularity_score += np.nan_to_num(stat_values["views_7d"], nan=0.0) * 1e-6  # tie-break by item stats
    product_idx = arrays.by_kind[KIND_CODES[ItemKind.PRODUCT]].astype(np.int64)
    new_idx = product_idx[(now - arrays.created_ts[product_idx]) <= NEW_ARRIVAL_DAYS * 86400.0]

    catalog_part = {f.name: getattr(arrays, f.name) for f in fields(CatalogArrays)}
    catalog_part["by_category"] = {c: _order_by(popularity_score, v) for c, v in arrays.by_category.items()}
    catalog_part["by_brand"] = {b: _order_by(popularity_score, v) for b, v in arrays.by_brand.items()}
    catalog_part["by_tag"] = {t: _order_by(popularity_score, v)[:TAG_LIST_CAP] for t, v in arrays.by_tag.items()}
    return ItemSnapshot(
        **catalog_part,
        log_price=np.log1p(arrays.price),
        stats=stat_values,
        slot_ctr=slot_ctr,
        new_arrivals=_order_by(popularity_score, new_idx),
        popular=_order_by(popularity_score, product_idx),
        popularity_score=popularity_score,
        covisitation=NeighbourArrays(covisitation, arrays.index, cache=cache_neighbours),
        popularity=pop,
        built_at=wall_time(),
    )
