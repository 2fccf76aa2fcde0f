"""The ranking of one slot: candidates -> features -> LightGBM -> rules (-> exploration) -> explanations.

Pure of I/O and of HTTP: `RecommendService` (services/recommend/service.py) resolves a request into a
`RankContext` once and asks `SlotPipeline.rank_slot` for each slot; offline evaluation calls the same method,
so what is measured is what serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from prometheus_client import Histogram

from services.common.catalog import ItemKind
from services.experiments.config import ArmChoice
from services.features.item_cache import (
    ItemColumns,
    ItemSnapshot,
    build_snapshot,
)
from services.recommend.ranking.candidates import (
    SOURCES,
    CandidateGenerator,
    CandidateSet,
    Filters,
    VisitorVector,
    eligible_products,
)
from services.recommend.ranking.exploration import Exploration, exploration_for, explore
from services.recommend.ranking.item2item import PER_ANCHOR, Strategy, neighbours
from services.recommend.ranking.ranker import (
    RankerModel,
    explain_item,
    feature_matrix,
    targeting_match,
)
from services.recommend.ranking.reasons import Locale, say
from services.recommend.ranking.rules import RuleContext, apply_rules, targeting_allows
from services.recommend.schemas import ANCHORED, SlotRequest

log = logging.getLogger(__name__)

STAGE_SECONDS = Histogram(
    "selaras_recommend_stage_seconds",
    "Time per ranking stage",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
)
# Label children resolved once: `.labels()` on every request is measurable on the hot path.
STAGE_VISITOR, STAGE_CANDIDATES, STAGE_FEATURES, STAGE_PREDICT, STAGE_RULES = (
    STAGE_SECONDS.labels(stage) for stage in ("visitor", "candidates", "features", "predict", "rules")
)
EXPLAIN_LIMIT = 3


@dataclass
class Ranked:
    idx: list[int]
    scores: list[float]
    reasons: list[list[str]] | None
    propensities: list[float]
    # With exploration: each item's rank in the deterministic eligible list, and that list's length.
    ranks: list[int] | None = None
    pool: int | None = None
    candidates: np.ndarray | None = None  # the generators' rows before scoring (offline candidate recall)
    unknown: int | None = None  # rerank slots: given ids the catalog does not know (ignored)


@dataclass(frozen=True)
class RankContext:
    """What every slot of one request is ranked with, resolved once per request."""

    snapshot: ItemSnapshot
    model: RankerModel | None  # None: not personalised (generic order, or the neighbour / shop order)
    visitor: VisitorVector
    context: dict[str, int]  # context features (hour, device, ...) of the request
    keys: list[str]  # context popularity keys, most specific first
    rules: RuleContext
    now: float  # business time of the request
    explain: bool  # personal reasons allowed (`explain` asked by a non-browser key)
    context_label: str = ""  # "in Jakarta this evening"
    persona: str | None = None
    anchors: tuple[int, ...] = ()  # snapshot rows of `context.item_ids`
    experiment: ArmChoice | None = None  # (key, arm, personalised)
    locale: Locale = "en"  # the wording of reasons (services/recommend/ranking/reasons.py)


@dataclass(frozen=True)
class SlotCandidates:
    candidates: CandidateSet
    unknown: int | None = None  # rerank: given ids the catalog does not know
    via: np.ndarray | None = None  # anchored: per candidate, the position in `anchors` it is closest to


@dataclass(frozen=True)
class PipelineOptions:
    """The settings the pipeline reads (RecommendSettings holds them; ranking does not import the settings)."""

    exploration: Mapping[str, Exploration]
    max_per_category: int | None
    max_pinned_per_slot: int
    # The benchmark's baseline: candidate item features through the Feast SDK on every request.
    naive_item_features: bool = False


class SlotPipeline:
    """Ranks one slot of a request. Holds the candidate generator and the exploration random stream."""

    def __init__(
        self,
        generator: CandidateGenerator,
        options: PipelineOptions,
        exploration_seed: int | None = None,
        item_stats_via_sdk: Callable[[list[str]], dict[str, dict[str, Any]]] | None = None,
    ):
        self.generator = generator
        self.options = options
        self._exploration_rng = np.random.default_rng(exploration_seed)
        self._item_stats_via_sdk = item_stats_via_sdk
        # Generators of experiment arms that name their own candidate sources, built once per set of sources.
        self._arm_generators: dict[tuple[str, ...], CandidateGenerator] = {}

    def rank_slot(self, slot: SlotRequest, rank: RankContext, shown: set[str]) -> Ranked:
        """Candidates -> scores -> rules (-> exploration) -> explanations for one slot."""
        filters = Filters(
            categories=frozenset(slot.filters.categories),
            brands=frozenset(slot.filters.brands),
            min_price=slot.filters.min_price,
            max_price=slot.filters.max_price,
            exclude=frozenset(slot.filters.exclude_items),
        )
        stage = time.perf_counter()
        found = self._candidates(slot, rank, filters)
        candidates = found.candidates
        STAGE_CANDIDATES.observe(time.perf_counter() - stage)
        snapshot, model = rank.snapshot, rank.model
        # Item-anchored slots are ranked as if the anchors were the visitor's latest items (they are on the page).
        visitor = self._anchored_visitor(rank) if slot.strategy in ANCHORED else rank.visitor

        X = None
        if model is not None and len(candidates.idx):
            stage = time.perf_counter()
            columns = snapshot.columns(candidates.idx, slot.name, rank.now)
            if self.options.naive_item_features and self._item_stats_via_sdk:
                columns = self._naive_columns(snapshot, candidates.idx, slot.name, rank.now)
            targeting = np.array(
                [targeting_match(snapshot.targeting.get(i), visitor, rank.persona) for i in candidates.idx.tolist()]
                if slot.kind is not ItemKind.PRODUCT
                else np.full(len(candidates.idx), 0.5)
            )
            X = feature_matrix(visitor, rank.context, columns, candidates.signals, targeting, rank.now)
            STAGE_FEATURES.observe(time.perf_counter() - stage)
            stage = time.perf_counter()
            scores = model.predict(X)
            STAGE_PREDICT.observe(time.perf_counter() - stage)
        elif slot.strategy == "personal":
            scores = self._popularity_scores(snapshot, candidates.idx, rank.keys)
        else:
            # Without a personal model: the neighbour order, or the shop's own order of its list.
            scores = np.linspace(1.0, 0.0, num=len(candidates.idx), endpoint=False)

        stage = time.perf_counter()
        exploration = exploration_for(self.options.exploration, slot.name, slot.kind.value)
        chosen = apply_rules(
            snapshot,
            candidates.idx,
            scores,
            # Exploring chooses among every rule-eligible item, so the rules see the whole ranked list.
            len(candidates.idx) if exploration.active else slot.count,
            shown,
            just_bought=rank.visitor.purchased_items if slot.kind is ItemKind.PRODUCT else (),
            max_per_category=self._category_quota(slot, rank.experiment),
            max_pinned=self.options.max_pinned_per_slot,
        )
        STAGE_RULES.observe(time.perf_counter() - stage)
        propensities = [1.0] * min(len(chosen), slot.count)
        ranks: list[int] | None = None
        pool: int | None = None
        if exploration.active:
            pinned = 0  # merchandiser pins keep their places; exploration starts after them
            while pinned < len(chosen) and snapshot.pinned[chosen[pinned][0]]:
                pinned += 1
            placement = explore(
                np.array([s for _, s in chosen]), slot.count, exploration, self._exploration_rng, pinned
            )
            chosen = [chosen[int(r)] for r in placement.order]
            propensities = placement.propensities.tolist()
            ranks, pool = placement.order.tolist(), placement.pool
        idx = [i for i, _ in chosen]
        reasons = None
        if rank.explain:
            if model is None and slot.strategy != "personal":
                reasons = self._item_reasons(slot, rank, found, idx)
            else:
                reasons = self._explain(snapshot, model, X, candidates, idx, visitor, rank.context_label, rank.locale)
        return Ranked(idx, [s for _, s in chosen], reasons, propensities, ranks, pool, candidates.idx, found.unknown)

    def _candidates(self, slot: SlotRequest, rank: RankContext, filters: Filters) -> SlotCandidates:
        snapshot = rank.snapshot
        if slot.strategy in ANCHORED:
            return self._anchored_candidates(slot, rank, filters)
        if slot.strategy == "rerank":
            return self._given_candidates(slot, rank, filters)
        if slot.kind is ItemKind.PRODUCT:
            personalized = rank.model is not None
            embeddings = rank.model.embeddings if rank.model else None
            fusion = rank.model.fusion if rank.model else None
            generator = self.generator_of(rank.experiment)
            return SlotCandidates(
                generator.products(
                    snapshot, rank.visitor, rank.keys, filters, personalized, embeddings=embeddings, fusion=fusion
                )
            )
        candidates = self.generator.creatives(snapshot, slot.kind, filters)
        allowed = np.array(
            [targeting_allows(snapshot.targeting.get(i), rank.rules) for i in candidates.idx.tolist()], dtype=bool
        )
        return SlotCandidates(
            CandidateSet(
                candidates.idx[allowed] if len(allowed) else candidates.idx,
                candidates.covisitation[allowed] if len(allowed) else candidates.covisitation,
                [s for s, a in zip(candidates.sources, allowed, strict=True) if a],
                {name: values[allowed] for name, values in candidates.signals.items()} if len(allowed) else {},
            )
        )

    def _anchored_candidates(self, slot: SlotRequest, rank: RankContext, filters: Filters) -> SlotCandidates:
        """Neighbours of the anchors in the strategy's order; with a model, the ranker's columns for them."""
        snapshot = rank.snapshot
        strategy: Strategy = "similar" if slot.strategy == "similar" else "bought_together"
        found = neighbours(
            snapshot, rank.anchors, strategy, eligible_products(snapshot, filters), PER_ANCHOR * len(rank.anchors)
        )
        source = "shared_tags" if strategy == "similar" else "covisitation"
        candidates = self._given_set(rank, found.idx, self._anchored_visitor(rank), source)
        return SlotCandidates(candidates, via=found.via)

    def _given_candidates(self, slot: SlotRequest, rank: RankContext, filters: Filters) -> SlotCandidates:
        """The shop's list in its own order: known ids only (unknown ones counted), each once, rule-eligible."""
        snapshot = rank.snapshot
        given = list(dict.fromkeys(slot.candidate_ids or ()))
        rows = np.array([snapshot.index[i] for i in given if i in snapshot.index], dtype=np.int64)
        unknown = len(given) - len(rows)
        rows = rows[eligible_products(snapshot, filters)[rows]] if len(rows) else rows
        return SlotCandidates(self._given_set(rank, rows, rank.visitor, "given"), unknown=unknown)

    def _given_set(self, rank: RankContext, idx: np.ndarray, visitor: VisitorVector, source: str) -> CandidateSet:
        """Candidates chosen outside the generators; the ranker's columns are computed only when a model will
        read them. `x_generator` is the generator whose kind of neighbour they are (NaN for the shop's list)."""
        signals: dict[str, np.ndarray] = {}
        if rank.model is not None:
            signals = self.generator.signals(rank.snapshot, visitor, idx, rank.model.embeddings)
            if source in SOURCES:
                signals["x_generator"] = np.full(len(idx), float(SOURCES.index(source)))
        covisitation = signals.get("x_covisitation", np.zeros(len(idx)))
        return CandidateSet(idx, covisitation, [source] * len(idx), signals)

    @staticmethod
    def _anchored_visitor(rank: RankContext) -> VisitorVector:
        visitor = rank.visitor
        anchor_ids = tuple(rank.snapshot.ids[a] for a in rank.anchors)
        recent = (*anchor_ids, *(i for i in visitor.recent_items if i not in anchor_ids))
        return replace(visitor, recent_items=recent)

    def generator_of(self, experiment: ArmChoice | None) -> CandidateGenerator:
        """The candidate generator of the visitor's arm: its own sources when it names them, else the service's.
        Arm sources are checked when the experiment is created (the admin API knows `SOURCES`); a configuration
        seeded from a file with an unknown name serves with the service's generators rather than failing."""
        if experiment is None or experiment.candidate_sources is None:
            return self.generator
        sources = experiment.candidate_sources
        generator = self._arm_generators.get(sources)
        if generator is None:
            base = self.generator
            try:
                generator = CandidateGenerator(base.count, base.fixed_per_source, sources, base.pool)
            except ValueError as exc:
                log.warning("experiment %s arm %s: %s", experiment.key, experiment.arm, exc)
                generator = base
            self._arm_generators[sources] = generator
        return generator

    def _category_quota(self, slot: SlotRequest, experiment: ArmChoice | None = None) -> int | None:
        """Diversity per category: personal and bought-together product slots by default; a similar or rerank
        slot (often one category by nature: a category page, look-alikes) only when it asks for one."""
        if slot.kind is not ItemKind.PRODUCT:
            return None
        if slot.strategy in ("similar", "rerank"):
            return slot.max_per_category
        arm_quota = experiment.max_per_category if experiment is not None else None
        return slot.max_per_category or arm_quota or self.options.max_per_category

    @staticmethod
    def _item_reasons(
        slot: SlotRequest, rank: RankContext, found: SlotCandidates, chosen: list[int]
    ) -> list[list[str]]:
        """Explanations of the neighbour order or the shop's order (no model): which anchor an item is close to.
        An anchor is never among the candidates, so no item is explained by itself."""
        snapshot = rank.snapshot
        if slot.strategy == "rerank" or found.via is None:
            return [[say(rank.locale, "generic")] for _ in chosen]
        row_of = {int(i): r for r, i in enumerate(found.candidates.idx)}
        via = found.via
        key = "similar_to" if slot.strategy == "similar" else "bought_together"
        return [[say(rank.locale, key, title=snapshot.titles[rank.anchors[int(via[row_of[i]])]])] for i in chosen]

    def _naive_columns(self, snapshot: ItemSnapshot, idx: np.ndarray, slot: str, now: float) -> ItemColumns:
        """The baseline the benchmark compares against: candidate item features fetched through the Feast SDK
        on every request (130-150 ms p99 when it was measured at the first review), instead of the in-process cache."""
        ids = [snapshot.ids[i] for i in idx]
        assert self._item_stats_via_sdk is not None
        rows = self._item_stats_via_sdk(ids)
        fresh = build_snapshot(
            snapshot, {i: rows[i] for i in ids if i in rows}, {}, {}, now=now, cache_neighbours=False
        )
        return fresh.columns(idx, slot, now)

    @staticmethod
    def _popularity_scores(snapshot: ItemSnapshot, idx: np.ndarray, keys: list[str]) -> np.ndarray:
        """Generic ranking: popularity in the most specific context, then overall popularity."""
        scores = np.zeros(len(idx), dtype=np.float64)
        if len(idx) == 0:
            return scores
        # Each candidate's position by snapshot row (candidate rows are distinct): a context's list can hold
        # every product, so one pass over the rows costs no more than reading the list.
        position_of = np.full(snapshot.size, -1, dtype=np.int64)
        position_of[idx] = np.arange(len(idx))
        weight = 1.0
        for key in keys:
            entry = snapshot.popularity.get(key)
            if entry is not None and len(entry[0]):
                rows, values = entry
                position = position_of[rows]
                hit = position >= 0
                top = values.max() or 1.0
                scores[position[hit]] += weight * values[hit] / top
            weight *= 0.5
        views = np.nan_to_num(snapshot.stats["views_7d"][idx], nan=0.0)
        return scores + 1e-3 * np.log1p(views)

    def _explain(
        self,
        snapshot: ItemSnapshot,
        model: RankerModel | None,
        X: np.ndarray | None,
        candidates: CandidateSet,
        chosen: list[int],
        visitor: VisitorVector,
        context_label: str,
        locale: Locale = "en",
    ) -> list[list[str]]:
        row_of = {int(i): r for r, i in enumerate(candidates.idx)}
        # "often chosen after X" must never name the item itself: each item reads the recent items other than it.
        recent_rows = [snapshot.index[i] for i in visitor.recent_items[:4] if i in snapshot.index]
        recent_categories = [
            snapshot.categories[snapshot.index[i]] for i in visitor.recent_items if i in snapshot.index
        ]
        if model is not None and X is not None and chosen:
            rows = [row_of[i] for i in chosen]
            contributions = model.contributions(X[rows])
            return [
                explain_item(
                    contributions[k],
                    X[r],
                    snapshot.titles[i],
                    snapshot.categories[i],
                    snapshot.brands[i],
                    visitor,
                    recent_categories.count(snapshot.categories[i]),
                    [snapshot.titles[other] for other in recent_rows if other != i][:3],
                    context_label,
                    candidates.sources[r],
                    EXPLAIN_LIMIT,
                    locale,
                )
                for k, (i, r) in enumerate(zip(chosen, rows, strict=True))
            ]
        return [[say(locale, "popular", context=context_label)] for _ in chosen]
