"""Offline evaluation on interaction histories with the protocol of the published full-ranking tables.

- leave-last-out: each user's last interaction is the test target; the model is trained by
  `train_on_histories` on everything else (whose own last interactions are its training queries), exactly as
  `selaras train --histories` trains the served model on a full history;
- every user is evaluated, over the whole catalog (a target no generator proposes is a miss), items the user
  already interacted with excluded;
- HR@10 and NDCG@10 as means over users, with 95% intervals (users are independent: mean ± 1.96 s/√n);
  candidate recall is the share of targets among the served candidates (at the served candidate count).

The pipeline is ranked by the serving code itself (`SlotPipeline.rank_slot`: generators -> LightGBM ->
rules); the baselines under the same exclusion: most popular, and the co-visitation index alone (the
order-aware next-item score the generator uses, popularity as the tie-break).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from services.features.aggregations import SegmentRules
from services.features.indexes import COVISIT_MAX_NEIGHBOURS
from services.features.item_cache import catalog_arrays
from services.offline.metrics import hit_at, ndcg_at
from services.profile.sequences import Histories, catalog_items
from services.recommend.ranking.next_item import next_item_scores
from services.recommend.ranking.pipeline import RankContext
from services.recommend.ranking.ranker import RankerModel
from services.recommend.ranking.rules import RuleContext
from services.recommend.repository import RecommendRepository
from services.recommend.schemas import SlotFilters, SlotRequest
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from services.recommend.training.histories import catalog_info, fold_world, seen_filter, train_on_histories
from services.recommend.training.train import TrainConfig

Progress = Callable[[str, float], None]
K = 10
PIPELINE = "lightgbm_pipeline"

# Full-ranking results on the S3-Rec splits (Zhou et al., CIKM 2020, all-items table) and the simple
# order-aware item-to-item model (transitions within 3 steps, 1/distance, rows damped by sqrt of their total,
# last 5 items with decay 0.6), both measured with this protocol: (HR@10, NDCG@10).
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "Sports_and_Outdoors": {
        "PopRec": (0.0094, 0.0053),
        "GRU4Rec": (0.0204, 0.0110),
        "SASRec": (0.0350, 0.0192),
        "BERT4Rec": (0.0191, 0.0099),
        "S3-Rec": (0.0385, 0.0204),
        "simple next-item model": (0.0574, 0.0354),
    },
    "Toys_and_Games": {
        "PopRec": (0.0113, 0.0061),
        "GRU4Rec": (0.0176, 0.0084),
        "SASRec": (0.0675, 0.0374),
        "BERT4Rec": (0.0203, 0.0099),
        "S3-Rec": (0.0700, 0.0376),
        "simple next-item model": (0.1095, 0.0711),
    },
}


@dataclass
class _Scores:
    hits: list[float] = field(default_factory=list)
    ndcgs: list[float] = field(default_factory=list)
    in_candidates: int = 0

    def add(self, ranked: list[int], target: int, candidates: np.ndarray | None = None) -> None:
        rank = ranked.index(target) if target in ranked else None
        self.hits.append(hit_at(rank, K))
        self.ndcgs.append(ndcg_at(rank, K))
        if candidates is not None and bool(np.any(candidates == target)):
            self.in_candidates += 1

    def summary(self) -> dict[str, float]:
        n = len(self.hits)
        out: dict[str, float] = {"users": float(n)}
        for name, values in ((f"hr@{K}", self.hits), (f"ndcg@{K}", self.ndcgs)):
            array = np.asarray(values)
            mean = float(array.mean()) if n else math.nan
            half = 1.96 * float(array.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
            out[name], out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = mean, mean - half, mean + half
        out["candidate_recall"] = self.in_candidates / n if n else math.nan
        return out


@dataclass
class HistoryEvaluation:
    name: str
    users: int
    interactions: int
    items: int
    max_candidates: int
    sources: tuple[str, ...]
    methods: dict[str, dict[str, float]]
    published: Mapping[str, tuple[float, float]]
    seconds: dict[str, float]
    model_metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "users": self.users,
            "interactions": self.interactions,
            "items": self.items,
            "max_candidates": self.max_candidates,
            "sources": list(self.sources),
            "methods": self.methods,
            "published": {k: {"hr@10": v[0], "ndcg@10": v[1]} for k, v in self.published.items()},
            "seconds": self.seconds,
            "model": self.model_metrics,
        }


def evaluate_histories(
    name: str,
    histories: Histories,
    settings: RecommendSettings,
    config: TrainConfig,
    progress: Progress | None = None,
    max_users: int | None = None,
    model: RankerModel | None = None,
) -> HistoryEvaluation:
    """`model`: a model already trained by `train_on_histories(histories.truncated(1), ...)` (one is trained
    here otherwise)."""
    report = progress or (lambda _stage, _fraction: None)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    model_metrics: dict[str, float] = {}
    if model is None:
        model, _, model_metrics = train_on_histories(
            histories.truncated(1),
            settings.candidate_count(),
            config,
            settings.candidate_sources,
            rules=SegmentRules.from_settings(settings),
            progress=report,
            pool=settings.candidate_pool,
        )
    seconds["train"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    rules = SegmentRules.from_settings(settings)
    items = catalog_items(histories)
    arrays = catalog_arrays(items)
    world = fold_world(histories.truncated(1), arrays, catalog_info(items), rules)
    snapshot = world.snapshot
    # Ranking reads only in-process state (snapshot, model, visitor row): no store is touched here.
    service = RecommendService(settings.model_copy(update={"exploration": {}}), cast(RecommendRepository, None))
    context, keys = world.context()
    rule_ctx = RuleContext(context["hour"], None, None, bool(context["is_payday_window"]))
    popularity = np.zeros(snapshot.size)
    for sequence in world.histories.sequences:
        for item in sequence:
            popularity[snapshot.index[item]] += 1.0
    tie_break = popularity / (popularity.max() + 1.0)

    users = [u for u, s in enumerate(histories.sequences) if len(s) >= 2]
    if max_users is not None and len(users) > max_users:
        users = sorted(np.random.default_rng(config.seed).choice(users, max_users, replace=False).tolist())
    scores = {PIPELINE: _Scores(), "popular": _Scores(), "covisitation": _Scores()}
    for n, u in enumerate(users):
        user, sequence = histories.users[u], histories.sequences[u]
        target = snapshot.index[sequence[-1]]
        history = sequence[:-1]
        visitor = world.visitor(user)
        seen = np.array([snapshot.index[i] for i in history], dtype=np.int64)
        filters = seen_filter(history)
        slot = SlotRequest(
            name="evaluation",
            count=K,
            filters=SlotFilters(exclude_items=sorted(filters.exclude)),
            max_per_category=K,  # the published protocol has no diversity quota
        )
        ranked = service.rank_slot(
            slot, RankContext(snapshot, model, visitor, dict(context), keys, rule_ctx, world.at, explain=False), set()
        )
        scores[PIPELINE].add(list(ranked.idx), target, ranked.candidates)

        values = tie_break.copy()
        values[seen] = -1.0
        scores["popular"].add(np.argsort(-values, kind="stable")[:K].tolist(), target)

        covis_idx, covis_scores = next_item_scores(snapshot, visitor.recent_items, COVISIT_MAX_NEIGHBOURS).next_item
        values = tie_break.copy()
        values[covis_idx] += covis_scores * 1e6
        values[seen] = -1.0
        scores["covisitation"].add(np.argsort(-values, kind="stable")[:K].tolist(), target, covis_idx)
        if n % 1000 == 0:
            report("ranking the test users", n / max(len(users), 1))
    seconds["evaluate"] = round(time.perf_counter() - started, 1)
    return HistoryEvaluation(
        name=name,
        users=len(users),
        interactions=histories.interactions,
        items=len(items),
        max_candidates=settings.candidate_count().for_products(len(items)),
        sources=tuple(settings.candidate_sources),
        methods={method: s.summary() for method, s in scores.items()},
        published=PUBLISHED.get(name, {}),
        seconds=seconds,
        model_metrics=model_metrics,
    )
