"""Offline ranking evaluation: the served pipeline against simple baselines, on the shop's own event log.

Protocols (each visitor's interactions of the target type, in time order):
- `leave-last-out`: the last is the test item, the one before it validation (early stopping), everything
  earlier is training. Like every leave-one-out protocol, one visitor's training queries can be later
  than another visitor's test query; features are still point in time (no query sees its own future).
- `time`: training before a cut-off, test after it (default cut-off: the last 20% of the target
  interactions are after it); the last 20% of the training queries are the validation set.

A visitor with fewer than `min_interactions` interactions of the target type is skipped and counted.

Each test query is ranked as the service would have ranked it at that moment: the point-in-time visitor
row (Feast, 1 ms before the query), request context, item statistics and candidate indexes replayed from
the log (the training replay, services/recommend/training/train.py), then the serving code itself
(`SlotPipeline.rank_slot`: candidate generators -> LightGBM -> rules, no exploration). The whole
catalog is the universe: a held-out item no generator proposes is a miss.

Baselines, ranked under the same rules (not just bought, at most N per category) so that only the scoring
differs: most popular (interactions of the target type so far), most popular recently (last 24 h and
last 7 days), item-to-item co-visitation alone, and LightGBM trained without personal features (on
non-personalised candidates).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np

from services.common.catalog import CatalogItem, ItemKind
from services.common.clock import wall_time
from services.common.events import EventType
from services.features.indexes import COVISIT_MAX_NEIGHBOURS
from services.features.item_cache import KIND_CODES, CatalogArrays, ItemSnapshot
from services.offline.estimators import cluster_se
from services.offline.metrics import hit_at, mrr_at, ndcg_at, rank_of
from services.recommend.ranking.candidates import Filters, VisitorVector
from services.recommend.ranking.next_item import next_item_scores
from services.recommend.ranking.pipeline import RankContext
from services.recommend.ranking.ranker import ModelMeta, RankerModel, feature_matrix
from services.recommend.ranking.rules import RuleContext, apply_rules
from services.recommend.repository import RecommendRepository
from services.recommend.schemas import SlotRequest
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from services.recommend.training.event_columns import LoggedEvent
from services.recommend.training.train import GRADES, Query, TrainConfig, Trainer

log = logging.getLogger(__name__)

Protocol = Literal["leave-last-out", "time"]
Target = Literal["purchase", "product_view", "add_to_cart", "click"]
PIPELINE = "lightgbm_pipeline"
METHODS = (PIPELINE, "popular", "popular_24h", "popular_7d", "covisitation", "lightgbm_no_personal")
TRAINING_TYPES = (EventType.PRODUCT_VIEW, EventType.ADD_TO_CART, EventType.PURCHASE)
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class EvalConfig:
    protocol: Protocol = "leave-last-out"
    target: Target = "product_view"
    ks: tuple[int, ...] = (5, 10, 20)
    seed: int = 7
    max_visitors: int | None = None  # a random sample of the eligible visitors, for quick runs
    min_interactions: int = 3
    cutoff: float | None = None  # time protocol: unix seconds
    test_fraction: float = 0.2
    max_test_queries: int = 5000  # time protocol: a random sample of the test interactions
    # Training queries: the earlier interactions of the target type (the protocol), or every earlier view,
    # cart and purchase (graded 1/2/3, as `selaras train` does).
    train_on: Literal["target", "behaviour"] = "target"
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class MethodScores:
    ranks: list[int | None] = field(default_factory=list)
    in_candidates: int = 0
    recommended: set[str] = field(default_factory=set)  # everything in a top-k list (coverage)
    # Test targets among the candidates, by the generator that proposed them first (the pipeline only).
    found_by: dict[str, int] = field(default_factory=dict)


@dataclass
class Evaluation:
    config: EvalConfig
    counts: dict[str, int]
    methods: dict[str, dict[str, float]]
    comparisons: dict[str, dict[str, float]]
    seconds: float
    # The pipeline's candidate recall split by the generator that proposed the test target first (they add
    # up to its candidate recall): what each candidate generator contributes.
    generator_recall: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        config = {
            "protocol": self.config.protocol,
            "target": self.config.target,
            "ks": list(self.config.ks),
            "seed": self.config.seed,
            "max_visitors": self.config.max_visitors,
            "min_interactions": self.config.min_interactions,
            "cutoff": self.config.cutoff,
            "train_on": self.config.train_on,
        }
        return {
            "config": config,
            "counts": self.counts,
            "methods": self.methods,
            "comparisons": self.comparisons,
            "generator_recall": self.generator_recall,
            "seconds": self.seconds,
        }


@dataclass
class Split:
    train: list[Query]
    validation: list[Query]
    test: list[Query]
    test_visitors: list[str]
    counts: dict[str, int]


def _query(event: LoggedEvent) -> Query:
    return Query(
        event.visitor_id,
        event.ts,
        event.device,
        event.channel,
        event.city,
        event.utc_offset_min,
        target=event.item_id,
        grade=GRADES[event.type],
    )


def split_queries(events: Sequence[LoggedEvent], products: set[str], config: EvalConfig) -> Split:
    """Training, validation and test queries of the protocol (events sorted by time)."""
    target_type = EventType(config.target)
    training_types = {target_type} if config.train_on == "target" else {*TRAINING_TYPES, target_type}

    def is_interaction(event: LoggedEvent, types: set[EventType] | frozenset[EventType]) -> bool:
        if event.type not in types or event.item_id not in products:
            return False
        # A click counts when it is a click on a recommendation (it echoes the recommendation id).
        return event.type is not EventType.CLICK or bool(event.recommendation_id)

    per_visitor: dict[str, list[LoggedEvent]] = {}
    for event in events:
        if is_interaction(event, {target_type}):
            per_visitor.setdefault(event.visitor_id, []).append(event)
    eligible = sorted(v for v, targets in per_visitor.items() if len(targets) >= config.min_interactions)
    counts = {
        "visitors_with_target": len(per_visitor),
        "visitors_skipped_few_interactions": len(per_visitor) - len(eligible),
    }
    rng = np.random.default_rng(config.seed)
    if config.max_visitors is not None and len(eligible) > config.max_visitors:
        eligible = sorted(rng.choice(np.array(eligible, dtype=object), config.max_visitors, replace=False).tolist())
    counts["visitors_evaluated"] = len(eligible)
    evaluated = set(eligible)

    train: list[Query] = []
    validation: list[Query] = []
    test: list[Query] = []
    if config.protocol == "leave-last-out":
        cut: dict[str, float] = {}
        for visitor in eligible:
            targets = per_visitor[visitor]
            test.append(_query(targets[-1]))
            validation.append(_query(targets[-2]))
            cut[visitor] = targets[-2].ts
        # Everything before a visitor's validation interaction trains (all of a visitor not evaluated).
        for event in events:
            if is_interaction(event, training_types) and event.ts < cut.get(event.visitor_id, math.inf):
                train.append(_query(event))
    else:
        cutoff = config.cutoff
        if cutoff is None:
            times = sorted(e.ts for targets in per_visitor.values() for e in targets)
            cutoff = times[int(len(times) * (1 - config.test_fraction))] if times else math.inf
        before = [_query(e) for e in events if is_interaction(e, training_types) and e.ts < cutoff]
        cut_at = int(len(before) * (1 - config.train.validation_fraction))
        train, validation = before[:cut_at], before[cut_at:]
        test = [_query(e) for v in eligible for e in per_visitor[v] if e.ts >= cutoff]
        if len(test) > config.max_test_queries:
            keep = rng.choice(len(test), config.max_test_queries, replace=False)
            test = [test[i] for i in sorted(keep)]
        counts["cutoff"] = int(cutoff) if math.isfinite(cutoff) else 0
    if len(train) > config.train.max_queries:
        keep = np.sort(rng.choice(len(train), config.train.max_queries, replace=False))
        train = [train[i] for i in keep]
    # Early stopping needs a few thousand queries, not all of them (the time protocol's are many).
    validation_cap = max(1000, config.train.max_queries // 4)
    if len(validation) > validation_cap:
        keep = np.sort(rng.choice(len(validation), validation_cap, replace=False))
        validation = [validation[i] for i in keep]
    test.sort(key=lambda q: q.ts)
    validation.sort(key=lambda q: q.ts)
    counts.update({"train_queries": len(train), "validation_queries": len(validation), "test_queries": len(test)})
    return Split(train, validation, test, sorted({q.visitor_id for q in test} & evaluated), counts)


class _Popularity:
    """Counts of target interactions replayed up to each query: all time, last 24 h and last 7 days."""

    WINDOWS: ClassVar[dict[str, float]] = {"popular_24h": 24 * 3600.0, "popular_7d": 7 * 24 * 3600.0}

    def __init__(self, events: Iterable[LoggedEvent], target: EventType, index: Mapping[str, int], size: int):
        self.events = iter(events)
        self.upcoming = next(self.events, None)
        self.target = target
        self.index = index
        self.total = np.zeros(size)
        self.behaviour = np.zeros(size)  # every view/cart/purchase: the tie-break
        self.windows = {name: np.zeros(size) for name in self.WINDOWS}
        self.queues: dict[str, deque[tuple[float, int]]] = {name: deque() for name in self.WINDOWS}

    def advance(self, ts: float) -> None:
        while self.upcoming is not None and self.upcoming.ts < ts:
            event = self.upcoming
            self.upcoming = next(self.events, None)
            row = self.index.get(event.item_id or "")
            if row is None:
                continue
            if event.type in TRAINING_TYPES:
                self.behaviour[row] += 1
            if event.type is self.target and (event.type is not EventType.CLICK or event.recommendation_id):
                self.total[row] += 1
                for name in self.WINDOWS:
                    self.windows[name][row] += 1
                    self.queues[name].append((event.ts, row))
        for name, span in self.WINDOWS.items():
            queue = self.queues[name]
            while queue and queue[0][0] < ts - span:
                self.windows[name][queue.popleft()[1]] -= 1

    def scores(self, method: str) -> np.ndarray:
        tie = self.behaviour / (self.behaviour.max() + 1.0)
        if method == "popular":
            return self.total + tie * 0.5
        return self.windows[method] + (self.total / (self.total.max() + 1.0)) * 0.5 + tie * 1e-3


class _EvaluationTrainer(Trainer):
    """The training pipeline with one snapshot grid for every build of an evaluation, so item statistics
    are read from Feast once per snapshot time instead of once per build."""

    def __init__(
        self,
        repository: RecommendRepository,
        config: TrainConfig,
        progress: Progress,
        stats: dict[float, dict[str, np.ndarray]],
        fetched: set[float],
    ):
        super().__init__(repository, config, progress)
        self._stats = stats
        self._fetched = fetched

    def item_stats_at(self, times: Sequence[float], arrays: CatalogArrays) -> dict[float, dict[str, np.ndarray]]:
        missing = [t for t in times if t not in self._fetched]
        if missing:
            self._stats.update(super().item_stats_at(missing, arrays))
            self._fetched.update(missing)
        return {t: self._stats[t] for t in times if t in self._stats}


class RankingEvaluator:
    def __init__(
        self,
        repository: RecommendRepository,
        settings: RecommendSettings,
        config: EvalConfig,
        progress: Progress | None = None,
    ):
        self.repository = repository
        # Evaluate the deterministic ranking: exploration would only add noise here.
        self.settings = settings.model_copy(update={"exploration": {}})
        self.config = config
        self.progress = progress or (lambda _stage, _fraction: None)

    def run(self) -> Evaluation:
        started = time.perf_counter()
        config = self.config
        self.progress("reading the event log", 0.0)
        events, catalog = Trainer(self.repository, config.train, self.progress).load()
        products = {item.item_id for item in catalog if item.kind is ItemKind.PRODUCT}
        if not events or not products:
            raise ValueError("nothing to evaluate: the event log or the catalog is empty")
        span = events[-1].ts - events[0].ts
        grid = replace(config.train, snapshot_step_s=config.train.snapshot_step_s or max(3600.0, span / 120))
        stats: dict[float, dict[str, np.ndarray]] = {}
        fetched: set[float] = set()
        trainer = _EvaluationTrainer(self.repository, grid, self.progress, stats, fetched)
        anonymous_trainer = _EvaluationTrainer(
            self.repository, replace(grid, personal=False), self.progress, stats, fetched
        )
        split = split_queries(events, products, config)
        # One set of point-in-time embeddings for both trainers and the test queries.
        trainer.learn_embeddings(events, [*split.train, *split.validation, *split.test], products)
        anonymous_trainer.embeddings = trainer.embeddings
        if not split.test:
            raise ValueError(f"no test queries: no visitor has {config.min_interactions}+ {config.target} interactions")
        if len(split.train) < 50:
            raise ValueError(f"only {len(split.train)} training queries; import more events first")
        self.progress("visitor features (Feast, point in time)", 0.0)
        rows = {
            "train": trainer.visitor_rows(split.train),
            "validation": trainer.visitor_rows(split.validation) if split.validation else [],
        }
        personal = self._fit(trainer, events, catalog, split, rows, personal=True)
        anonymous = self._fit(anonymous_trainer, events, catalog, split, rows, personal=False)
        scores = self._rank_test_queries(trainer, events, catalog, split, personal, anonymous)
        return self._summarise(split, scores, catalog, time.perf_counter() - started)

    # -- models -------------------------------------------------------------------------------------------
    def _fit(
        self,
        trainer: Trainer,
        events: Sequence[LoggedEvent],
        catalog: Sequence[CatalogItem],
        split: Split,
        rows: Mapping[str, list[tuple[VisitorVector, dict[str, int]]]],
        personal: bool,
    ) -> RankerModel:
        label = "personal" if personal else "no personal features"
        self.progress(f"training LightGBM ({label})", 0.0)
        train_set, _ = trainer.build(events, catalog, split.train, rows["train"], personal=personal)
        valid_set, _ = trainer.build(
            events, catalog, split.validation, rows["validation"], personal=personal, evaluate_only=True
        )
        if not train_set.groups:
            raise ValueError("no training group had a positive among its candidates")
        booster = trainer.fit(train_set, valid_set)
        log.info(
            "evaluation model (%s): best iteration %s of %d groups",
            label,
            booster.best_iteration,
            len(train_set.groups),
        )
        self.progress(f"training LightGBM ({label})", 1.0)
        meta = ModelMeta(
            version=f"evaluation-{'personal' if personal else 'anonymous'}",
            created_at=wall_time(),
            features=tuple(booster.feature_name()),
            feature_service="",
            personal=personal,
        )
        return RankerModel(booster, meta)

    # -- ranking the test queries -------------------------------------------------------------------------
    def _rank_test_queries(
        self,
        trainer: Trainer,
        events: Sequence[LoggedEvent],
        catalog: Sequence[CatalogItem],
        split: Split,
        personal: RankerModel,
        anonymous: RankerModel,
    ) -> dict[str, MethodScores]:
        config = self.config
        depth = max(config.ks)
        service = RecommendService(self.settings, self.repository)
        slot = SlotRequest(name="evaluation", count=depth)
        max_per_category = self.settings.max_per_category
        scores = {method: MethodScores() for method in METHODS}
        popularity: _Popularity | None = None
        visitors = trainer.visitor_rows(split.test)
        self.progress("ranking the test queries", 0.0)

        def rank(
            q_index: int,
            query: Query,
            snapshot: ItemSnapshot,
            visitor: VisitorVector,
            context: Mapping[str, int],
            keys: list[str],
        ) -> None:
            nonlocal popularity
            if popularity is None:
                popularity = _Popularity(events, EventType(config.target), snapshot.index, snapshot.size)
            popularity.advance(query.ts)
            target = query.target or ""
            just_bought = visitor.purchased_items
            rule_ctx = RuleContext(
                context.get("hour", 0), query.device, query.city, bool(context.get("is_payday_window"))
            )

            # The pipeline exactly as served (a visitor without history gets the served fallback), with the
            # item embeddings a model trained just before the query would carry.
            personal.embeddings = trainer.embeddings.at(query.ts) if trainer.embeddings is not None else None
            model = personal if visitor.known else None
            ranked = service.rank_slot(
                slot,
                RankContext(snapshot, model, visitor, dict(context), keys, rule_ctx, query.ts, explain=False),
                set(),
            )
            # Candidate recall and which generator found the target: the generators exactly as the pipeline ran
            # them (the model's embeddings and learned cut), so these are the served candidates and their sources.
            candidates = service.generator.products(
                snapshot,
                visitor,
                keys,
                Filters(),
                personalized=model is not None,
                embeddings=model.embeddings if model is not None else None,
                fusion=model.fusion if model is not None else None,
            )
            self._record(
                scores[PIPELINE],
                snapshot,
                [snapshot.ids[i] for i in ranked.idx],
                target,
                candidates.idx,
                candidates.sources,
            )

            # LightGBM without personal features, on non-personalised candidates.
            plain = service.generator.products(snapshot, visitor, keys, Filters(), personalized=False)
            X = feature_matrix(
                visitor,
                context,
                snapshot.columns(plain.idx, slot.name, query.ts),
                plain.signals,
                np.full(len(plain.idx), 0.5),
                query.ts,
                personal=False,
            )
            chosen = apply_rules(snapshot, plain.idx, anonymous.predict(X), depth, set(), just_bought, max_per_category)
            self._record(
                scores["lightgbm_no_personal"], snapshot, [snapshot.ids[i] for i, _ in chosen], target, plain.idx
            )

            # Popularity baselines over every available product.
            universe = snapshot.by_kind[KIND_CODES[ItemKind.PRODUCT]]
            for method in ("popular", "popular_24h", "popular_7d"):
                values = popularity.scores(method)[universe]
                chosen = apply_rules(snapshot, universe, values, depth, set(), just_bought, max_per_category)
                self._record(scores[method], snapshot, [snapshot.ids[i] for i, _ in chosen], target, universe)

            # Co-visitation alone: the next-item score of the visitor's last items (as the generator reads it).
            idx, values = next_item_scores(snapshot, visitor.recent_items, COVISIT_MAX_NEIGHBOURS).next_item
            available = snapshot.available[idx] if len(idx) else np.zeros(0, dtype=bool)
            idx, values = idx[available], values[available]
            chosen = apply_rules(snapshot, idx, values, depth, set(), just_bought, max_per_category)
            self._record(scores["covisitation"], snapshot, [snapshot.ids[i] for i, _ in chosen], target, idx)
            if q_index % 100 == 0:
                self.progress("ranking the test queries", q_index / max(len(split.test), 1))

        trainer.build(events, catalog, split.test, visitors, on_query=rank)
        self.progress("ranking the test queries", 1.0)
        return scores

    def _record(
        self,
        scores: MethodScores,
        snapshot: ItemSnapshot,
        ranked: list[str],
        target: str,
        candidates: np.ndarray,
        sources: Sequence[str] | None = None,
    ) -> None:
        scores.ranks.append(rank_of(target, ranked))
        row = snapshot.index.get(target)
        found = np.flatnonzero(candidates == row) if row is not None and len(candidates) else np.zeros(0, np.int64)
        if len(found):
            scores.in_candidates += 1
            if sources is not None:
                source = sources[int(found[0])]
                scores.found_by[source] = scores.found_by.get(source, 0) + 1
        scores.recommended.update(ranked[: max(self.config.ks)])

    # -- the report ---------------------------------------------------------------------------------------
    def _summarise(
        self, split: Split, scores: Mapping[str, MethodScores], catalog: Sequence[CatalogItem], seconds: float
    ) -> Evaluation:
        ks = self.config.ks
        available = sum(1 for item in catalog if item.kind is ItemKind.PRODUCT and item.active and item.in_stock)
        clusters = np.array([q.visitor_id for q in split.test], dtype=object).astype(str)
        methods: dict[str, dict[str, float]] = {}
        per_query_ndcg: dict[str, np.ndarray] = {}
        for method, result in scores.items():
            n = len(result.ranks)
            row: dict[str, float] = {"queries": float(n)}
            for k in ks:
                row[f"hr@{k}"] = float(np.mean([hit_at(r, k) for r in result.ranks])) if n else math.nan
                ndcg = np.array([ndcg_at(r, k) for r in result.ranks])
                row[f"ndcg@{k}"] = float(ndcg.mean()) if n else math.nan
                row[f"mrr@{k}"] = float(np.mean([mrr_at(r, k) for r in result.ranks])) if n else math.nan
                if k == _primary_k(ks):
                    per_query_ndcg[method] = ndcg
                    se, _ = cluster_se((ndcg - ndcg.mean()) / max(n, 1), clusters[:n])
                    row[f"ndcg@{k}_ci95_low"] = float(ndcg.mean() - 1.96 * se)
                    row[f"ndcg@{k}_ci95_high"] = float(ndcg.mean() + 1.96 * se)
                    # Hit rate the same way: queries of one visitor are not independent (time protocol).
                    hits = np.array([hit_at(r, k) for r in result.ranks], dtype=np.float64)
                    se, _ = cluster_se((hits - hits.mean()) / max(n, 1), clusters[:n])
                    row[f"hr@{k}_ci95_low"] = float(hits.mean() - 1.96 * se)
                    row[f"hr@{k}_ci95_high"] = float(hits.mean() + 1.96 * se)
            row["coverage"] = len(result.recommended) / available if available else math.nan
            row["candidate_recall"] = result.in_candidates / n if n else math.nan
            methods[method] = row
        comparisons: dict[str, dict[str, float]] = {}
        k = _primary_k(ks)
        model = per_query_ndcg.get(PIPELINE)
        if model is not None:
            for method, values in per_query_ndcg.items():
                if method == PIPELINE or len(values) != len(model):
                    continue
                diff = model - values
                se, _ = cluster_se((diff - diff.mean()) / max(len(diff), 1), clusters[: len(diff)])
                comparisons[method] = {
                    f"ndcg@{k}_difference": float(diff.mean()),
                    "ci95_low": float(diff.mean() - 1.96 * se),
                    "ci95_high": float(diff.mean() + 1.96 * se),
                }
        pipeline = scores.get(PIPELINE)
        generator_recall: dict[str, float] = {}
        if pipeline is not None and pipeline.ranks:
            for source, count in sorted(pipeline.found_by.items(), key=lambda kv: -kv[1]):
                generator_recall[source] = count / len(pipeline.ranks)
        return Evaluation(
            self.config, split.counts, methods, comparisons, round(seconds, 1), generator_recall=generator_recall
        )


def _primary_k(ks: Sequence[int]) -> int:
    return 10 if 10 in ks else sorted(ks)[len(ks) // 2]
