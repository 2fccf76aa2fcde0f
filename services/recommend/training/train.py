"""Training the LightGBM ranker from the event log, with point-in-time features from Feast's offline store.

Two kinds of training queries:
- impressions: what the service showed (grouped by recommendation id), labelled by the outcomes that echo
  the id (click 1, add to cart 2, purchase 3);
- behaviour (a new shop without impressions yet): each product view, cart or purchase is a query whose
  candidates come from the *same generators that serve*, run on point-in-time inputs; the item the visitor
  went to is the positive (graded 1/2/3), the other candidates are negatives.

Point in time: visitor rows and context come from Feast's historical retrieval at 1 ms before the query;
item statistics from Feast at the snapshot time before the query; co-visitation and popularity indexes are
replayed from the log in time order, so no query sees the future.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import pandas as pd

from services.common.catalog import CatalogItem, ItemKind
from services.common.clock import wall_datetime, wall_time
from services.common.consent import ConsentDefaults
from services.common.events import EventType
from services.features import schema as F
from services.features.item_cache import (
    KIND_CODES,
    STAT_COLUMNS,
    CatalogArrays,
    ItemSnapshot,
    build_snapshot,
    catalog_arrays,
)
from services.offline.metrics import rank_of, summarize
from services.recommend.ranking.candidates import (
    CandidateCount,
    CandidateGenerator,
    Filters,
    VisitorVector,
    context_keys_for,
)
from services.recommend.ranking.item_embeddings import ItemEmbeddings
from services.recommend.ranking.ranker import ModelMeta, feature_matrix
from services.recommend.repository import RecommendRepository
from services.recommend.training.embeddings import EMBEDDING_REFITS, EmbeddingsOverTime, interaction_sequences
from services.recommend.training.event_columns import EventColumns, EventColumnsBuilder, LoggedEvent
from services.recommend.training.fit import TrainingSet, fit_ranker, ranker_params
from services.recommend.training.replay import LiveNeighbours, Replay

log = logging.getLogger(__name__)

GRADES = {EventType.PRODUCT_VIEW: 1, EventType.CLICK: 1, EventType.ADD_TO_CART: 2, EventType.PURCHASE: 3}
Progress = Callable[[str, float], None]
# Offline evaluation (services/recommend/training/evaluation.py): a query's point-in-time inputs, instead of a group.
QueryHook = Callable[[int, "Query", ItemSnapshot, VisitorVector, Mapping[str, int], list[str]], None]


MIN_NEGATIVES = 50
NEGATIVES_SHARE = 0.1


@dataclass(frozen=True)
class TrainConfig:
    source: Literal["auto", "behaviour", "impressions"] = "auto"
    target: Literal["any", "product_view", "add_to_cart", "purchase", "click"] = "any"
    max_queries: int = 12_000
    # The served candidate count (RecommendSettings.candidate_count()): a ranker trained on a smaller pool never
    # sees the candidates of the generators that only fill a larger one, and ranks them blindly.
    candidates: int | CandidateCount = field(default_factory=CandidateCount)
    # The served candidate pool (RecommendSettings.candidate_pool; 0: none), for the same reason.
    candidate_pool: int = 0
    # A learned cut of a pool this large (services/recommend/ranking/fusion.py), fitted on the training queries
    # and saved with the model (0, or not above `candidates`: none). `train_on_histories` learns it.
    fusion_pool: int = 0
    # Negatives kept per training query (lambdarank's cost grows with the square of the group). None: a tenth
    # of the query's candidates, at least 50. With 50 of 1,500 candidates the ranker saw too few of the deep
    # ones it must order when serving (Sports NDCG@10 0.0399, against 0.0425 with 150 and 0.0423 at 500).
    max_negatives: int | None = None
    validation_fraction: float = 0.2
    snapshot_step_s: float | None = None  # None: spread ~120 snapshots over the log's time span
    num_boost_round: int = 300
    early_stopping_rounds: int = 30
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 40
    seed: int = 7
    personal: bool = True
    min_impression_groups: int = 300
    attribution_window_s: float = 24 * 3600.0
    threads: int = 1  # OpenMP threads spin under contention: on a shared 2-core box 2 threads ran 6x slower
    # The deployment's default for the `analytics` purpose: visitors whom it (or their choice) refuses are left
    # out of training entirely.
    analytics_default: Literal["opt_in", "opt_out"] = "opt_out"

    def negatives_for(self, candidates: int) -> int:
        if self.max_negatives is not None:
            return self.max_negatives
        return max(MIN_NEGATIVES, round(candidates * NEGATIVES_SHARE))


@dataclass
class Query:
    visitor_id: str
    ts: float
    device: str | None
    channel: str | None
    city: str | None
    utc_offset_min: int | None
    target: str | None = None  # behaviour queries
    grade: int = 0
    shown: list[str] = field(default_factory=list)  # impression queries
    labels: dict[str, int] = field(default_factory=dict)
    slot: str = ""


@dataclass
class TrainResult:
    meta: ModelMeta
    model_text: bytes
    metrics: dict[str, Any]
    # Learned from every logged interaction, saved with the ranker (its x_embedding* columns read them).
    embeddings: ItemEmbeddings | None = None

    def publish(self, repository: RecommendRepository) -> None:
        """The ranker and what serving needs with it (the item embeddings) into the model registry: every
        caller that trains (`selaras train`, the demo world, simulations) publishes through here."""
        embeddings = self.embeddings.to_bytes() if self.embeddings is not None else None
        repository.save_model(self.model_text, self.meta, embeddings)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _noop(_: str, __: float) -> None:
    return None


class Trainer:
    def __init__(self, repository: RecommendRepository, config: TrainConfig, progress: Progress | None = None):
        self.repository = repository
        self.config = config
        self.progress = progress or _noop
        self.generator = CandidateGenerator(config.candidates, pool=config.candidate_pool)
        self.embeddings: EmbeddingsOverTime | None = None  # set by `learn_embeddings`

    # -- queries ------------------------------------------------------------------------------------
    def load(self) -> tuple[EventColumns, list[CatalogItem]]:
        """The logged events of visitors who allow `analytics` (training is analytics use), in time order, and
        the catalog. The log is streamed once into compact columns (event_columns.py): memory grows by a few
        dozen bytes per event, not by a validated event object each; consent is asked once per visitor."""
        columns = EventColumnsBuilder()
        for event in self.repository.logged_events():
            columns.add(LoggedEvent.of(event))
        defaults = ConsentDefaults(analytics=self.config.analytics_default)
        refused = self.repository.refusing("analytics", columns.visitors(), defaults)
        return columns.build(leave_out=refused), self.repository.catalog()

    def behaviour_queries(self, events: Iterable[LoggedEvent], products: set[str]) -> list[Query]:
        wanted = set(GRADES) - {EventType.CLICK}
        if self.config.target != "any":
            wanted = {EventType(self.config.target)}
        queries = [
            Query(
                e.visitor_id,
                e.ts,
                e.device,
                e.channel,
                e.city,
                e.utc_offset_min,
                target=e.item_id,
                grade=GRADES[e.type],
            )
            for e in events
            if e.type in wanted and e.item_id in products
        ]
        return self._cap(queries)

    def impression_queries(self, events: Sequence[LoggedEvent]) -> list[Query]:
        groups: dict[str, Query] = {}
        for e in events:
            if e.type is EventType.IMPRESSION and e.recommendation_id and e.item_id:
                key = f"{e.recommendation_id}:{e.slot}"
                query = groups.get(key)
                if query is None:
                    query = groups[key] = Query(
                        e.visitor_id, e.ts, e.device, e.channel, e.city, e.utc_offset_min, slot=e.slot
                    )
                query.shown.append(e.item_id)
        by_recommendation: dict[str, list[Query]] = {}
        for key, query in groups.items():
            by_recommendation.setdefault(key.split(":", 1)[0], []).append(query)
        for e in events:
            grade = GRADES.get(e.type)
            if grade is None or not e.recommendation_id or not e.item_id:
                continue
            for query in by_recommendation.get(e.recommendation_id, []):
                if e.item_id in query.shown and e.ts - query.ts <= self.config.attribution_window_s:
                    query.labels[e.item_id] = max(query.labels.get(e.item_id, 0), grade)
        queries = sorted(groups.values(), key=lambda q: q.ts)
        return self._cap(queries)

    def _cap(self, queries: list[Query]) -> list[Query]:
        if len(queries) <= self.config.max_queries:
            return queries
        rng = np.random.default_rng(self.config.seed)
        keep = np.sort(rng.choice(len(queries), self.config.max_queries, replace=False))
        return [queries[i] for i in keep]

    def learn_embeddings(self, events: Sequence[LoggedEvent], queries: Sequence[Query], products: set[str]) -> None:
        """Point-in-time item embeddings for `build` (refitted at EMBEDDING_REFITS moments up to the last query)."""
        if not queries:
            return
        start, end = events[0].ts, max(q.ts for q in queries)
        step = (end - start) / EMBEDDING_REFITS
        self.embeddings = EmbeddingsOverTime(
            events, products, [start + step * (n + 1) for n in range(EMBEDDING_REFITS)]
        )

    # -- point-in-time inputs --------------------------------------------------------------------------
    def visitor_rows(self, queries: Sequence[Query]) -> list[tuple[VisitorVector, dict[str, int]]]:
        """Feast historical retrieval, 1 ms before each query (the query's own event is not seen)."""
        entity_df = pd.DataFrame(
            {
                F.VISITOR_KEY: [q.visitor_id for q in queries],
                F.TIMESTAMP_FIELD: [_utc(q.ts - 0.001) for q in queries],
                "request_ts": [q.ts for q in queries],
                "request_utc_offset_min": [q.utc_offset_min if q.utc_offset_min is not None else 420 for q in queries],
                "request_device": [q.device or "" for q in queries],
                "request_channel": [q.channel or "" for q in queries],
                "request_city": [q.city or "" for q in queries],
                "query_index": np.arange(len(queries)),
            }
        )
        joined = self.repository.historical_visitor_rows(entity_df).sort_values("query_index")
        records = joined.to_dict("records")
        out = []
        for query, record in zip(queries, records, strict=True):
            row = {name: _clean(record.get(name)) for name in F.VISITOR_FEATURES}
            # Context features come from the on-demand feature view, as the FeatureService defines them.
            context = {name: int(record[name]) for name in F.CONTEXT_FEATURES}
            out.append((VisitorVector.from_row(query.visitor_id, F.visitor_row_at(row, query.ts)), context))
        return out

    def snapshot_times(self, events: Sequence[LoggedEvent], queries: Sequence[Query]) -> list[float]:
        if not queries:
            return []
        start, end = events[0].ts, queries[-1].ts
        step = self.config.snapshot_step_s or max(3600.0, (end - start) / 120)
        times = list(np.arange(start + step, end + step, step))
        return [float(t) for t in times]

    def item_stats_at(self, times: Sequence[float], arrays: CatalogArrays) -> dict[float, dict[str, np.ndarray]]:
        """Item statistics as of each snapshot time, as columns aligned with the catalog (Feast, point in time)."""
        product_ids = [arrays.ids[i] for i in arrays.by_kind[KIND_CODES[ItemKind.PRODUCT]]]
        if not times or not product_ids:
            return {}
        entity_df = pd.DataFrame(
            {
                F.ITEM_KEY: np.tile(np.asarray(product_ids, dtype=object), len(times)),
                F.TIMESTAMP_FIELD: np.repeat([_utc(t) for t in times], len(product_ids)),
                "snapshot_ts": np.repeat(np.asarray(times), len(product_ids)),
            }
        )
        joined = self.repository.historical_item_stats(entity_df)
        joined["row"] = joined[F.ITEM_KEY].map(arrays.index)
        n = arrays.size
        out: dict[float, dict[str, np.ndarray]] = {}
        for at, group in joined.groupby("snapshot_ts"):
            rows = group["row"].to_numpy(dtype=np.int64)
            columns: dict[str, np.ndarray] = {}
            for name in STAT_COLUMNS:
                column = np.full(n, np.nan)
                column[rows] = pd.to_numeric(group[name], errors="coerce").to_numpy(dtype=np.float64)
                columns[name] = column
            with_slots = group[group["slot_names"].map(lambda v: v is not None and len(v) > 0)]
            for row, slots, ctrs in zip(
                with_slots["row"], with_slots["slot_names"], with_slots["slot_ctr_7d"], strict=True
            ):
                for slot, ctr in zip(slots, ctrs, strict=False):
                    columns.setdefault(f"slot:{slot}", np.full(n, np.nan))[int(row)] = float(ctr)
            out[float(str(at)) if not isinstance(at, float) else at] = columns
        return out

    # -- the set ----------------------------------------------------------------------------------------
    def build(
        self,
        events: Sequence[LoggedEvent],
        catalog: Sequence[CatalogItem],
        queries: Sequence[Query],
        visitors: Sequence[tuple[VisitorVector, dict[str, int]]],
        personal: bool = True,
        evaluate_only: bool = False,
        on_query: QueryHook | None = None,
    ) -> tuple[TrainingSet, list[dict[str, Any]]]:
        """Replay the log in time order, rebuild snapshots at the snapshot times, and turn each query into a
        group of candidate rows. Also returns, per query, the ranked ids of the model-free baselines."""
        arrays = catalog_arrays(catalog)
        times = self.snapshot_times(events, queries)
        self.progress("item statistics (Feast, point in time)", 0.0)
        stats = self.item_stats_at(times, arrays)
        replay = Replay()
        # Co-visitation is read live from the replay (it is always exactly "before this query").
        live_neighbours = LiveNeighbours(replay.covisitation)
        rng = np.random.default_rng(self.config.seed)
        snapshot: ItemSnapshot | None = None
        snapshot_index = -1
        replayed = iter(events)
        upcoming = next(replayed, None)
        rows: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        groups: list[int] = []
        query_ts: list[float] = []
        details: list[dict[str, Any]] = []
        for q_index, (query, (visitor, context)) in enumerate(zip(queries, visitors, strict=True)):
            # Advance the replay to just before the query.
            while upcoming is not None and upcoming.ts < query.ts:
                replay.observe(upcoming)
                upcoming = next(replayed, None)
            wanted = bisect.bisect_right(times, query.ts) - 1
            if snapshot is None or wanted != snapshot_index:
                at = times[wanted] if wanted >= 0 else query.ts
                snapshot = build_snapshot(
                    arrays,
                    stats.get(at, {}) if wanted >= 0 else {},
                    live_neighbours,
                    replay.popularity.scores,
                    now=query.ts,
                    cache_neighbours=False,
                )
                snapshot_index = wanted
            if q_index % 200 == 0:
                self.progress("building training groups", q_index / max(len(queries), 1))
            keys = context_keys_for(query.city or visitor.city, query.device, query.ts, query.utc_offset_min)
            if on_query is not None:
                on_query(q_index, query, snapshot, visitor, context, keys)
                continue
            embeddings = self.embeddings.at(query.ts) if self.embeddings is not None else None
            if query.shown:
                idx = np.array([snapshot.index[i] for i in query.shown if i in snapshot.index], dtype=np.int64)
                signals = self.generator.signals(snapshot, visitor, idx, embeddings) if personal else {}
                grades = np.array([query.labels.get(snapshot.ids[i], 0) for i in idx], dtype=np.float64)
            else:
                candidates = self.generator.products(
                    snapshot, visitor, keys, Filters(), personalized=personal, embeddings=embeddings
                )
                idx, signals = candidates.idx, dict(candidates.signals)
                grades = np.array(
                    [query.grade if snapshot.ids[i] == query.target else 0 for i in idx], dtype=np.float64
                )
            detail = {
                "ts": query.ts,
                "target": query.target,
                "candidate_ids": [snapshot.ids[i] for i in idx],
                "popular": [snapshot.ids[i] for i in snapshot.popular[:50]],
            }
            details.append(detail)
            if len(idx) == 0:
                continue
            if not evaluate_only:
                if grades.max() <= 0 or grades.min() == grades.max():
                    continue  # a group without a positive (or only positives) teaches a ranker nothing
                negatives = np.flatnonzero(grades == 0)
                kept = self.config.negatives_for(len(idx))
                if len(negatives) > kept:
                    # Lambdarank costs grow with the square of the group: a sample of negatives suffices.
                    keep = np.sort(
                        np.concatenate(
                            [
                                np.flatnonzero(grades > 0),
                                rng.choice(negatives, kept, replace=False),
                            ]
                        )
                    )
                    idx, grades = idx[keep], grades[keep]
                    signals = {name: values[keep] for name, values in signals.items()}
            X = feature_matrix(
                visitor,
                context,
                snapshot.columns(idx, query.slot, query.ts),
                signals,
                np.full(len(idx), 0.5),
                query.ts,
                personal=personal,
            )
            detail["row_start"] = sum(groups)
            rows.append(X)
            labels.append(grades)
            groups.append(len(idx))
            query_ts.append(query.ts)
        X_all = np.vstack(rows) if rows else np.zeros((0, len(F.RANKER_FEATURES)))
        y_all = np.concatenate(labels) if labels else np.zeros(0)
        return TrainingSet(X_all, y_all, groups, query_ts), details

    # -- training -----------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        started = time.perf_counter()
        self.progress("reading the event log", 0.0)
        events, catalog = self.load()
        products = {item.item_id for item in catalog if item.kind is ItemKind.PRODUCT}
        if not events or not products:
            raise ValueError("nothing to train on: the event log or the catalog is empty")
        source = self.config.source
        impression_queries = self.impression_queries(events) if source in ("auto", "impressions") else []
        labelled = [q for q in impression_queries if q.labels]
        if source == "impressions" or (source == "auto" and len(labelled) >= self.config.min_impression_groups):
            queries, used = impression_queries, "impressions"
        else:
            queries, used = self.behaviour_queries(events, products), "behaviour"
        if len(queries) < 50:
            raise ValueError(f"only {len(queries)} training queries ({used}); ingest more events first")
        self.progress("visitor features (Feast, point in time)", 0.0)
        visitors = self.visitor_rows(queries)
        self.progress("learning item embeddings", 0.0)
        self.learn_embeddings(events, queries, products)
        cut = int(len(queries) * (1 - self.config.validation_fraction))
        split_ts = queries[cut].ts
        train_set, _ = self.build(events, catalog, queries[:cut], visitors[:cut], personal=self.config.personal)
        valid_set, valid_details = self.build(
            events, catalog, queries[cut:], visitors[cut:], personal=self.config.personal, evaluate_only=True
        )
        if not train_set.groups:
            raise ValueError("no training group had a positive among its candidates")
        self.progress("training LightGBM", 0.0)
        booster = self.fit(train_set, valid_set)
        metrics = self.evaluate(booster, valid_set, valid_details, queries[cut:])
        measured_iteration = booster.best_iteration
        # The figures above are for a model that never saw the later queries; the model served learns from all
        # of them too, with as many rounds as early stopping chose.
        self.progress("training LightGBM on every query", 0.0)
        later_set, _ = self.build(events, catalog, queries[cut:], visitors[cut:], personal=self.config.personal)
        every_set = train_set.extended(later_set)
        configured = self.config
        self.config = replace(configured, num_boost_round=max(measured_iteration, 1))
        try:  # self.fit: a Dask trainer fits on its cluster
            booster = self.fit(every_set, TrainingSet(np.zeros((0, every_set.X.shape[1])), np.zeros(0), [], []))
        finally:
            self.config = configured
        metrics.update(
            {
                "source": used,
                "train_queries": len(every_set.groups),
                "train_rows": int(every_set.X.shape[0]),
                "validation_queries": len(valid_details),
                "split_ts": split_ts,
                "best_iteration": measured_iteration,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        version = wall_datetime().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        meta = ModelMeta(
            version=version,
            created_at=wall_time(),
            features=F.RANKER_FEATURES,
            feature_service=F.FEATURE_SERVICE,
            metrics=metrics,
            params=self.params(),
            personal=self.config.personal,
        )
        text = booster.model_to_string().encode()
        return TrainResult(meta, text, metrics, ItemEmbeddings.fit(interaction_sequences(events, products)))

    def params(self) -> dict[str, Any]:
        return ranker_params(self.config)

    def fit(self, train_set: TrainingSet, valid_set: TrainingSet) -> lgb.Booster:
        return fit_ranker(self.config, train_set, valid_set)

    def evaluate(
        self,
        booster: lgb.Booster,
        valid_set: TrainingSet,
        details: Sequence[Mapping[str, Any]],
        queries: Sequence[Query],
    ) -> dict[str, Any]:
        """NDCG@10 etc. on the later queries: the model over its candidates (a target no generator proposed is a
        miss) against popularity over the whole catalog, on exactly the same queries."""
        scores = (
            np.asarray(booster.predict(valid_set.X, num_threads=self.config.threads))
            if len(valid_set.X)
            else np.zeros(0)
        )
        model_ranks: list[int | None] = []
        popular_ranks: list[int | None] = []
        in_candidates = 0
        for detail, query in zip(details, queries, strict=True):
            target = query.target
            if target is None:  # impression queries: the best-labelled shown item is the target
                target = max(query.labels, key=lambda i: query.labels[i]) if query.labels else None
                if target is None:
                    continue
            candidate_ids: list[str] = detail["candidate_ids"]
            if "row_start" in detail:
                start = detail["row_start"]
                order = np.argsort(-scores[start : start + len(candidate_ids)], kind="stable")
                ranked = [candidate_ids[i] for i in order]
            else:
                ranked = []
            if target in candidate_ids:
                in_candidates += 1
            model_ranks.append(rank_of(target, ranked))
            popular_ranks.append(rank_of(target, detail["popular"]))
        model = summarize(model_ranks)
        popular = summarize(popular_ranks)
        n = max(len(model_ranks), 1)
        return {
            "ndcg@10": round(model["ndcg@10"], 4),
            "hr@10": round(model["hr@10"], 4),
            "popularity_ndcg@10": round(popular["ndcg@10"], 4),
            "popularity_hr@10": round(popular["hr@10"], 4),
            "candidate_recall": round(in_candidates / n, 4),
            "evaluated_queries": len(model_ranks),
        }


def _clean(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
