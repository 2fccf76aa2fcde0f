"""Stage one: candidate generators over the in-memory indexes (a few hundred items, in about a millisecond).

Generators: co-visitation of recently viewed items, the visitor's affine categories and brands, trending in
context (city × part of day, device), new arrivals, and complements of cart items. Training uses the very
same generators with point-in-time inputs, so the ranker learns on the candidate distribution it serves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.common import features as F
from services.common.catalog import ItemKind
from services.common.context import daypart, local_time, zone_for
from services.common.indexes import GLOBAL_CONTEXT
from services.recommend.catalog_cache import KIND_CODES, ItemSnapshot

SOURCES = ("covisitation", "category", "brand", "trending", "new_arrival", "cart", "popular")


@dataclass(frozen=True)
class VisitorVector:
    """A visitor's online row, parsed once per request into what generators and the ranker need."""

    visitor_id: str
    known: bool
    row: Mapping[str, Any]
    category_affinity: Mapping[str, float] = field(default_factory=dict)
    brand_affinity: Mapping[str, float] = field(default_factory=dict)
    recent_items: Sequence[str] = ()
    cart_items: frozenset[str] = frozenset()
    purchased_items: frozenset[str] = frozenset()
    city: str | None = None
    utc_offset_min: int | None = None

    @classmethod
    def from_row(cls, visitor_id: str, row: Mapping[str, Any] | None) -> VisitorVector:
        if not row or not row.get("event_count"):
            return cls(visitor_id, False, row or {})
        return cls(
            visitor_id=visitor_id,
            known=True,
            row=row,
            category_affinity=dict(
                zip(row.get("top_categories") or [], row.get("top_category_scores") or [], strict=False)
            ),
            brand_affinity=dict(zip(row.get("top_brands") or [], row.get("top_brand_scores") or [], strict=False)),
            recent_items=tuple(row.get("recent_items") or ()),
            cart_items=frozenset(row.get("cart_items") or ()),
            purchased_items=frozenset(row.get("purchased_items") or ()),
            city=row.get("city") or None,
        )

    def value(self, name: str) -> float:
        value = self.row.get(name)
        if value is None:
            return math.nan
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan


@dataclass(frozen=True)
class CandidateSet:
    idx: np.ndarray  # item rows in the snapshot
    covisitation: np.ndarray  # co-visitation score per candidate (0 when not co-visited)
    sources: list[str]  # the first generator that proposed each candidate (for explanations)


@dataclass(frozen=True)
class Filters:
    categories: frozenset[str] = frozenset()
    brands: frozenset[str] = frozenset()
    min_price: float | None = None
    max_price: float | None = None
    exclude: frozenset[str] = frozenset()


def context_keys_for(city: str | None, device: str | None, now: float, utc_offset_min: int | None) -> list[str]:
    """Most specific first: city × part of day, city, part of day, device, everything."""
    part = daypart(local_time(now, zone_for(city, utc_offset_min)).hour)
    keys: list[str] = []
    if city:
        keys += [f"city:{city.lower()}|daypart:{part}", f"city:{city.lower()}"]
    keys.append(f"daypart:{part}")
    if device:
        keys.append(f"device:{device}")
    keys.append(GLOBAL_CONTEXT)
    return keys


class CandidateGenerator:
    def __init__(self, max_candidates: int = 500, per_source: int = 80):
        self.max_candidates = max_candidates
        self.per_source = per_source

    def products(
        self,
        snapshot: ItemSnapshot,
        visitor: VisitorVector,
        context_keys: Sequence[str],
        filters: Filters,
        personalized: bool = True,
    ) -> CandidateSet:
        chosen: dict[int, str] = {}
        covis: dict[int, float] = {}

        def add(indices: np.ndarray | Sequence[int], source: str, limit: int) -> None:
            taken = 0
            for i in indices:
                i = int(i)
                if i not in chosen:
                    chosen[i] = source
                taken += 1
                if taken >= limit or len(chosen) >= self.max_candidates:
                    return

        if personalized and visitor.known:
            for rank, item_id in enumerate(visitor.recent_items[:6]):
                neighbours = snapshot.covisitation.get(item_id)
                if neighbours is not None:
                    idx, scores = neighbours
                    for i, s in zip(idx[: self.per_source], scores[: self.per_source], strict=False):
                        covis[int(i)] = covis.get(int(i), 0.0) + float(s) / (rank + 1)
            add(sorted(covis, key=lambda i: -covis[i]), "covisitation", 2 * self.per_source)
            for item_id in visitor.cart_items:
                neighbours = snapshot.covisitation.get(item_id)
                if neighbours is not None:
                    add(neighbours[0], "cart", self.per_source // 4)
            for category, score in sorted(visitor.category_affinity.items(), key=lambda kv: -kv[1])[:4]:
                idx = snapshot.by_category.get(category)
                if idx is not None:
                    add(idx, "category", max(10, int(self.per_source * (0.5 + score))))
            for brand, _ in sorted(visitor.brand_affinity.items(), key=lambda kv: -kv[1])[:3]:
                idx = snapshot.by_brand.get(brand)
                if idx is not None:
                    add(idx, "brand", self.per_source // 4)
        for key in context_keys:
            entry = snapshot.popularity.get(key)
            if entry is not None:
                add(entry[0], "trending", self.per_source // 2)
        add(snapshot.new_arrivals, "new_arrival", self.per_source // 4)
        add(snapshot.popular, "popular", self.per_source)

        idx = np.fromiter(chosen.keys(), dtype=np.int64, count=len(chosen))
        keep = self._eligible(snapshot, idx, filters, KIND_CODES[ItemKind.PRODUCT])
        if filters.categories and keep.sum() < self.per_source:
            # A category filter narrows a lot: top up from the category lists themselves.
            for category in filters.categories:
                extra = snapshot.by_category.get(category)
                if extra is not None:
                    add(extra, "category", self.per_source)
            idx = np.fromiter(chosen.keys(), dtype=np.int64, count=len(chosen))
            keep = self._eligible(snapshot, idx, filters, KIND_CODES[ItemKind.PRODUCT])
        idx = idx[keep]
        return CandidateSet(
            idx=idx,
            covisitation=np.array([covis.get(int(i), 0.0) for i in idx], dtype=np.float64),
            sources=[chosen[int(i)] for i in idx],
        )

    def creatives(self, snapshot: ItemSnapshot, kind: ItemKind, filters: Filters) -> CandidateSet:
        """Banners and CTAs: few enough to rank all that are available."""
        idx = snapshot.by_kind.get(KIND_CODES[kind], np.empty(0, dtype=np.int64))
        idx = idx[self._eligible(snapshot, idx, filters, KIND_CODES[kind])]
        return CandidateSet(idx=idx, covisitation=np.zeros(len(idx)), sources=["catalog"] * len(idx))

    @staticmethod
    def _eligible(snapshot: ItemSnapshot, idx: np.ndarray, filters: Filters, kind_code: int) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros(0, dtype=bool)
        keep = snapshot.available[idx] & (snapshot.kind[idx] == kind_code)
        if filters.categories:
            keep &= np.array([snapshot.categories[i] in filters.categories for i in idx], dtype=bool)
        if filters.brands:
            keep &= np.array([snapshot.brands[i] in filters.brands for i in idx], dtype=bool)
        if filters.min_price is not None:
            keep &= snapshot.price[idx] >= filters.min_price
        if filters.max_price is not None:
            keep &= snapshot.price[idx] <= filters.max_price
        if filters.exclude:
            keep &= np.array([snapshot.ids[i] not in filters.exclude for i in idx], dtype=bool)
        return keep


def visitor_feature_names() -> list[str]:
    return list(F.VISITOR_FEATURES)
