"""Stage one: candidate generators over the in-memory indexes (a few hundred items, in about a millisecond).

Generators: co-visitation of recently viewed items, item embeddings of the recent items (the model's, when it
ships them: services/recommend/ranking/item_embeddings.py), the visitor's affine categories and brands, trending in
context (city × part of day, device), new arrivals, and complements of cart items. Training uses the very
same generators with point-in-time inputs, so the ranker learns on the candidate distribution it serves.

How many candidates a request serves grows with the catalogue (`CandidateCount`). When the model carries a
learned fusion (services/recommend/ranking/fusion.py), the generators propose a pool of its size and the
fusion's best ones up to the served count are kept; otherwise the first ones in priority order (or,
with RECOMMEND_CANDIDATE_POOL, the best by reciprocal-rank fusion).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.common.catalog import ItemKind
from services.common.context import daypart, local_time, zone_for
from services.features.indexes import GLOBAL_CONTEXT
from services.features.item_cache import KIND_CODES, ItemSnapshot, category_code
from services.features.schema import as_number
from services.recommend.ranking.fusion import CandidateFusion, feature_names, fusion_features
from services.recommend.ranking.item_embeddings import EmbeddingScores, ItemEmbeddings
from services.recommend.ranking.next_item import NextItemScores, next_item_scores

SOURCES = (
    "covisitation",
    "category",
    "brand",
    "trending",
    "new_arrival",
    "cart",
    "popular",
    "two_step",
    "shared_tags",
    "embedding",
)


PER_SOURCE = 80  # the base budget of one generator (some take multiples or fractions of it) at 500 candidates
BUDGET_BASE_CANDIDATES = 500  # more candidates than this: every budget grows in proportion
EMBEDDING_BUDGET = 2  # multiples of PER_SOURCE

# The pooled first stage (CandidateGenerator(pool=...)): every generator proposes `pool / served count` times
# its budget and the served count with the best fused score are kept, instead of the first ones in priority
# order. Fused score: the sum over the generators proposing an item of weight / (POOL_RANK_OFFSET + its rank
# in that generator) (reciprocal-rank fusion), so items several generators agree on, and the top of the
# order-aware generators, win over the deep tail of any one list. Fixed weights: the order-aware generators
# find the next item far more often than the context lists; offset and weights picked on the candidate
# recall of 2,000 sampled Toys users (docs/quality-ablation.md).
POOL_RANK_OFFSET = 200.0
POOL_WEIGHTS: Mapping[str, float] = {
    "covisitation": 1.0,
    "embedding": 1.5,
    "cart": 1.0,
    "two_step": 0.8,
    "shared_tags": 0.8,
    "category": 0.15,
    "brand": 0.15,
    "trending": 0.1,
    "popular": 0.1,
    "new_arrival": 0.05,
}


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
        return as_number(self.row.get(name))


@dataclass(frozen=True)
class CandidateSet:
    idx: np.ndarray  # item rows in the snapshot
    covisitation: np.ndarray  # co-visitation score per candidate (0 when not co-visited)
    sources: list[str]  # the first generator that proposed each candidate (for explanations)
    signals: Mapping[str, np.ndarray] = field(default_factory=dict)  # ranker columns ("x_...") per candidate


@dataclass(frozen=True)
class _Budget:
    served: int  # candidates served per request
    per_source: int  # the base budget of one generator
    scale: float  # every budget times this: the pool over the served count (1: no pool)


@dataclass(frozen=True)
class Filters:
    categories: frozenset[str] = frozenset()
    brands: frozenset[str] = frozenset()
    min_price: float | None = None
    max_price: float | None = None
    exclude: frozenset[str] = frozenset()


def budget_for(max_candidates: int) -> int:
    """The base budget of one generator for `max_candidates`: without it, the lists of 500 candidates, once
    deduplicated, fill about 700 and every further candidate would come from the context lists' tail."""
    return max(PER_SOURCE, round(PER_SOURCE * max_candidates / BUDGET_BASE_CANDIDATES))


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


@dataclass(frozen=True)
class CandidateCount:
    """How many candidates a request serves: `minimum` on small catalogues, `share` of the catalogue's products
    on large ones, at most `limit`. At a fixed count the share of next items among the candidates falls as the
    catalogue grows (500 hold 39% of them on 12,000 toys, 33% on 18,000 sports items; 1,500 hold 53% and 47%:
    docs/quality-ablation.md), while a 2,000-item shop is served as well by 500 at a third of the ranker's work."""

    minimum: int = 500
    share: float = 0.08
    limit: int = 1500

    def for_products(self, products: int) -> int:
        # Whole hundreds: a catalogue that grows by a few items does not change the count on every refresh.
        wanted = round(products * self.share / 100) * 100
        return max(self.minimum, min(wanted, self.limit))


class CandidateGenerator:
    def __init__(
        self,
        count: int | CandidateCount = 500,
        per_source: int | None = None,
        sources: Sequence[str] = SOURCES,
        pool: int = 0,
    ):
        """`count`: candidates served per request (an int: that many, whatever the catalogue). `pool`:
        candidates pooled before keeping the served count by fused score (0 or at most the count: no pooling,
        the first ones in generator priority order). `per_source`: the base budget of a generator (default:
        PER_SOURCE, grown in proportion above 500 candidates so the generators fill them)."""
        if pool < 0:
            raise ValueError(f"candidate pool must be >= 0, got {pool}")
        self.count = count if isinstance(count, CandidateCount) else CandidateCount(count, 0.0, count)
        self.fixed_per_source = per_source
        self.pool = pool
        unknown = set(sources) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown candidate sources {sorted(unknown)}; known: {', '.join(SOURCES)}")
        self.sources = frozenset(sources)
        self._served: tuple[int, int, _Budget] | None = None  # (id(snapshot), its size, its budget)

    def budget(self, snapshot: ItemSnapshot) -> _Budget:
        """The served count and generator budgets for this snapshot's catalogue (cached per snapshot: counting
        its products reads every row)."""
        cached = self._served
        if cached is not None and cached[0] == id(snapshot) and cached[1] == snapshot.size:
            return cached[2]
        served = self.count.for_products(int(np.count_nonzero(snapshot.kind == KIND_CODES[ItemKind.PRODUCT])))
        per_source = self.fixed_per_source if self.fixed_per_source is not None else budget_for(served)
        # Budgets grow with the pool so the generators do propose about `pool` candidates.
        budget = _Budget(served, per_source, max(1.0, self.pool / served) if served > 0 else 1.0)
        self._served = (id(snapshot), snapshot.size, budget)
        return budget

    def products(
        self,
        snapshot: ItemSnapshot,
        visitor: VisitorVector,
        context_keys: Sequence[str],
        filters: Filters,
        personalized: bool = True,
        embeddings: ItemEmbeddings | None = None,
        fusion: CandidateFusion | None = None,
    ) -> CandidateSet:
        """Union of the generators in priority order, deduplicated, at most the served count (vectorised).
        `embeddings`: the serving model's item embeddings (None: that generator and its columns are absent).
        `fusion`: the serving model's learned cut (its own pool size; None: the pool setting, fused by ranks)."""
        proposals = self._propose(snapshot, visitor, context_keys, filters, personalized, embeddings, fusion)
        if proposals is None:
            return CandidateSet(np.zeros(0, dtype=np.int64), np.zeros(0), [])
        served = self.budget(snapshot).served
        every, source_codes, first = proposals.every, proposals.codes, proposals.first
        if len(first) > served:
            if fusion is not None:
                scores = fusion.score(proposals.features(snapshot))
                first = first[np.argsort(-scores, kind="stable")[:served]]
            elif self.pool > served:
                fused = np.bincount(proposals.inverse, weights=_fusion_weights(proposals.parts, proposals.labels))
                first = first[np.argsort(-fused, kind="stable")[:served]]
        keep = np.sort(first)[:served]  # first occurrence wins: generator priority order
        idx = every[keep]
        signals = proposals.scores.columns(idx) | _embedding_columns(proposals.embedded, idx)
        signals["x_generator"] = source_codes[keep].astype(np.float64)
        return CandidateSet(
            idx=idx,
            covisitation=signals["x_covisitation"],
            sources=[SOURCES[c] for c in source_codes[keep].tolist()],  # Python ints: numpy scalars index slowly
            signals=signals,
        )

    def pooled(
        self,
        snapshot: ItemSnapshot,
        visitor: VisitorVector,
        context_keys: Sequence[str],
        filters: Filters,
        pool: int,
        embeddings: ItemEmbeddings | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training the fusion: every candidate of a pool of about `pool` items (snapshot rows) and its fusion
        features, exactly as `products` computes them before the cut."""
        scaled = CandidateFusion(pool, (), np.zeros(0), np.zeros(0), np.zeros(0))  # only its pool size is read
        proposals = self._propose(snapshot, visitor, context_keys, filters, True, embeddings, scaled)
        if proposals is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, len(feature_names(SOURCES))))
        return proposals.every[proposals.first], proposals.features(snapshot)

    def _propose(
        self,
        snapshot: ItemSnapshot,
        visitor: VisitorVector,
        context_keys: Sequence[str],
        filters: Filters,
        personalized: bool,
        embeddings: ItemEmbeddings | None,
        fusion: CandidateFusion | None,
    ) -> _Proposals | None:
        """Every generator's list, in priority order, with budgets scaled to the pool (None: nothing proposed)."""
        eligible = self._eligible_mask(snapshot, filters, KIND_CODES[ItemKind.PRODUCT])
        parts: list[np.ndarray] = []
        labels: list[int] = []
        budget = self.budget(snapshot)
        per_source = budget.per_source
        scale = max(1.0, fusion.pool / budget.served) if fusion is not None else budget.scale

        def add(indices: np.ndarray | None, source: str, limit: int) -> None:
            if indices is None or len(indices) == 0 or source not in self.sources:
                return
            wanted = int(limit * scale)
            # The first `wanted` eligible rows: a list (all products, a context's items) is often far longer
            # than its budget, so its head is searched first and the whole list only when the head falls short.
            head = indices[: 2 * wanted]
            chosen = head[eligible[head]][:wanted]
            if len(chosen) < wanted and len(head) < len(indices):
                chosen = indices[eligible[indices]][:wanted]
            if len(chosen):
                parts.append(chosen)
                labels.append(SOURCES.index(source))

        scores = NextItemScores()
        embedded: EmbeddingScores | None = None
        if personalized and visitor.known:
            scores = next_item_scores(snapshot, visitor.recent_items, per_source)
            embedded = _embedding_scores(embeddings, snapshot, visitor, int(per_source * scale))
            # Budgets: what comes next first, then items liked by similar visitors, what comes two steps
            # later, then items sharing tags.
            add(scores.ranked("next_item"), "covisitation", 2 * per_source)
            if embedded is not None:
                add(embedded.ranked(), "embedding", EMBEDDING_BUDGET * per_source)
            add(scores.ranked("two_step"), "two_step", 2 * per_source)
            add(scores.ranked("shared_tags"), "shared_tags", per_source + per_source // 4)
            # Sorted: a set of strings iterates in an order that changes with the process's hash seed.
            for item_id in sorted(visitor.cart_items):
                neighbours = snapshot.covisitation.get(item_id)
                if neighbours is not None:
                    add(neighbours[0], "cart", per_source // 4)
            for category, score in sorted(visitor.category_affinity.items(), key=lambda kv: -kv[1])[:4]:
                add(snapshot.by_category.get(category), "category", max(10, int(per_source * (0.5 + score))))
            for brand, _ in sorted(visitor.brand_affinity.items(), key=lambda kv: -kv[1])[:3]:
                add(snapshot.by_brand.get(brand), "brand", per_source // 4)
        for key in context_keys:
            entry = snapshot.popularity.get(key)
            if entry is not None:
                add(entry[0], "trending", per_source // 2)
        add(snapshot.new_arrivals, "new_arrival", per_source // 4)
        add(snapshot.popular, "popular", per_source)
        for category in filters.categories:  # a category filter narrows a lot: top up from its own list
            add(snapshot.by_category.get(category), "category", per_source)

        if not parts:
            return None
        every = np.concatenate(parts)
        codes = np.repeat(np.array(labels, dtype=np.int8), [len(p) for p in parts])
        _, first = np.unique(every, return_index=True)
        return _Proposals(parts, labels, every, codes, first, scores, embedded)

    def signals(
        self,
        snapshot: ItemSnapshot,
        visitor: VisitorVector,
        idx: np.ndarray,
        embeddings: ItemEmbeddings | None = None,
    ) -> dict[str, np.ndarray]:
        """The ranker's candidate columns for rows chosen elsewhere (logged impressions): no generator proposed
        them, so `x_generator` is missing."""
        per_source = self.budget(snapshot).per_source
        scores = next_item_scores(snapshot, visitor.recent_items, per_source) if visitor.known else None
        embedded = _embedding_scores(embeddings, snapshot, visitor, per_source) if visitor.known else None
        signals = (scores or NextItemScores()).columns(idx) | _embedding_columns(embedded, idx)
        signals["x_generator"] = np.full(len(idx), np.nan)
        return signals

    @staticmethod
    def _eligible_mask(snapshot: ItemSnapshot, filters: Filters, kind_code: int) -> np.ndarray:
        mask = snapshot.available & (snapshot.kind == kind_code)
        if filters.categories:
            mask = mask & np.isin(snapshot.category_code, [category_code(c) for c in filters.categories])
        if filters.brands:
            mask = mask & np.array([b in filters.brands for b in snapshot.brands], dtype=bool)
        if filters.min_price is not None:
            mask = mask & (snapshot.price >= filters.min_price)
        if filters.max_price is not None:
            mask = mask & (snapshot.price <= filters.max_price)
        if filters.exclude:
            mask = mask.copy()
            mask[[snapshot.index[i] for i in filters.exclude if i in snapshot.index]] = False
        return mask

    def creatives(self, snapshot: ItemSnapshot, kind: ItemKind, filters: Filters) -> CandidateSet:
        """Banners and CTAs: few enough to rank all that are available."""
        idx = snapshot.by_kind.get(KIND_CODES[kind], np.empty(0, dtype=np.int64))
        idx = idx[self._eligible(snapshot, idx, filters, KIND_CODES[kind])]
        return CandidateSet(idx=idx, covisitation=np.zeros(len(idx)), sources=["catalog"] * len(idx))

    @classmethod
    def _eligible(cls, snapshot: ItemSnapshot, idx: np.ndarray, filters: Filters, kind_code: int) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros(0, dtype=bool)
        return cls._eligible_mask(snapshot, filters, kind_code)[idx]


def eligible_products(snapshot: ItemSnapshot, filters: Filters) -> np.ndarray:
    """Available products passing a slot's filters (a mask over snapshot rows): the eligibility of candidates
    chosen outside the generators (item-to-item neighbours, a shop's own list)."""
    return CandidateGenerator._eligible_mask(snapshot, filters, KIND_CODES[ItemKind.PRODUCT])


@dataclass(frozen=True)
class _Proposals:
    """The generators' lists before the cut: `every` concatenated, `first` the first occurrence of each
    distinct row (np.unique order), `inverse` each proposal's distinct row."""

    parts: list[np.ndarray]
    labels: list[int]
    every: np.ndarray
    codes: np.ndarray
    first: np.ndarray
    scores: NextItemScores
    embedded: EmbeddingScores | None

    @property
    def inverse(self) -> np.ndarray:
        """np.unique's inverse, computed only by the pooled paths that read it (most requests do not)."""
        return np.searchsorted(self.every[self.first], self.every)

    def features(self, snapshot: ItemSnapshot) -> np.ndarray:
        """The learned fusion's rows (services/recommend/ranking/fusion.py), one per distinct candidate."""
        positions = np.concatenate([np.arange(len(part), dtype=np.float64) for part in self.parts])
        best = np.full((len(self.first), len(SOURCES)), np.inf)
        np.minimum.at(best, (self.inverse, self.codes.astype(np.int64)), positions)
        rows = self.every[self.first]
        signals = self.scores.columns(rows) | _embedding_columns(self.embedded, rows)
        return fusion_features(best, signals, snapshot.popularity_score[rows])


def _fusion_weights(parts: list[np.ndarray], labels: list[int]) -> np.ndarray:
    """Each proposal's share of the fused score: its generator's weight / (offset + rank in that list)."""
    return np.concatenate(
        [
            POOL_WEIGHTS[SOURCES[label]] / (POOL_RANK_OFFSET + np.arange(len(part), dtype=np.float64))
            for part, label in zip(parts, labels, strict=True)
        ]
    )


def _embedding_scores(
    embeddings: ItemEmbeddings | None, snapshot: ItemSnapshot, visitor: VisitorVector, per_source: int
) -> EmbeddingScores | None:
    if embeddings is None or not visitor.recent_items:
        return None
    # More than the budget: the visitor's own items score high and are filtered out as seen.
    return embeddings.scores(snapshot, visitor.recent_items, (EMBEDDING_BUDGET + 2) * per_source)


def _embedding_columns(embedded: EmbeddingScores | None, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The embedding columns (missing, NaN, without embeddings: not the same as a score of 0)."""
    if embedded is None:
        return {name: np.full(len(idx), np.nan) for name in EMBEDDING_COLUMNS}
    return embedded.columns(idx)


EMBEDDING_COLUMNS = ("x_embedding", "x_embedding_rank", "x_embedding_last")
