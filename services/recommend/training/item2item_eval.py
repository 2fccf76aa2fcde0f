"""Offline evaluation of the item-to-item strategies ("similar", "bought_together") on interaction histories
("user item item ..." files, the format of `selaras evaluate ranking --histories`).

Protocol: leave-last-out. The indexes are folded from every history without its last interaction (the same fold
the aggregator runs, `fold_world`); each user's second-to-last item is the anchor (the product page the user was
on) and the last item the target. The strategy ranks the anchor's neighbours over the whole catalog, items the
user already interacted with excluded; a target outside the neighbour list is a miss. HR@10 and NDCG@10 are
means over users with 95% intervals; `coverage` is the share of anchors with at least ten neighbours. "popular"
(most interacted-with items, the same exclusion) is the floor both must beat.

With a ranker (`model`, trained by `train_on_histories` on the same histories without their last items), the
"<strategy>_personal" rows rank the anchor's neighbours as a known visitor's item-anchored slot is served: the
serving code (`SlotPipeline.rank_slot`: the anchor's neighbours -> LightGBM -> rules) with the user's
folded visitor row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from services.features.aggregations import SegmentRules
from services.features.item_cache import catalog_arrays
from services.offline.metrics import hit_at, ndcg_at
from services.profile.sequences import Histories, catalog_items
from services.recommend.ranking.item2item import STRATEGIES, neighbours
from services.recommend.ranking.pipeline import RankContext
from services.recommend.ranking.ranker import RankerModel
from services.recommend.ranking.rules import RuleContext
from services.recommend.repository import RecommendRepository
from services.recommend.schemas import SlotFilters, SlotRequest
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from services.recommend.training.histories import FoldedWorld, catalog_info, fold_world, seen_filter

K = 10
Progress = Callable[[str, float], None]


@dataclass
class _Metric:
    hits: list[float] = field(default_factory=list)
    ndcgs: list[float] = field(default_factory=list)
    covered: int = 0

    def add(self, ranked: list[int], target: int, neighbour_count: int) -> None:
        rank = ranked.index(target) if target in ranked else None
        self.hits.append(hit_at(rank, K))
        self.ndcgs.append(ndcg_at(rank, K))
        self.covered += neighbour_count >= K

    def summary(self) -> dict[str, float]:
        n = len(self.hits)
        out: dict[str, float] = {"users": float(n), "coverage": self.covered / n if n else math.nan}
        for name, values in ((f"hr@{K}", self.hits), (f"ndcg@{K}", self.ndcgs)):
            array = np.asarray(values)
            mean = float(array.mean()) if n else math.nan
            half = 1.96 * float(array.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
            out[name], out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = mean, mean - half, mean + half
        return out


@dataclass(frozen=True)
class Item2ItemEvaluation:
    name: str
    users: int
    items: int
    methods: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "users": self.users, "items": self.items, "methods": self.methods}


def evaluate_item2item(
    name: str,
    histories: Histories,
    max_users: int | None = None,
    seed: int = 7,
    progress: Progress | None = None,
    model: RankerModel | None = None,
) -> Item2ItemEvaluation:
    """HR@10 / NDCG@10 of each item-to-item strategy (and most popular) predicting the last item from the one
    before it; with `model`, also each strategy re-ranked for the user as served."""
    report = progress or (lambda _stage, _fraction: None)
    items = catalog_items(histories)
    arrays = catalog_arrays(items)
    report("folding the histories without their last items", 0.0)
    world = fold_world(histories.truncated(1), arrays, catalog_info(items), SegmentRules())
    snapshot = world.snapshot
    counts = np.zeros(snapshot.size)
    for sequence in world.histories.sequences:
        for item in sequence:
            counts[snapshot.index[item]] += 1.0
    popular = np.argsort(-counts, kind="stable")

    users = [u for u, s in enumerate(histories.sequences) if len(s) >= 2]
    if max_users is not None and len(users) > max_users:
        users = sorted(np.random.default_rng(seed).choice(users, max_users, replace=False).tolist())
    metrics = {strategy: _Metric() for strategy in STRATEGIES} | {"popular": _Metric()}
    if model is not None:
        metrics |= {f"{strategy}_personal": _Metric() for strategy in STRATEGIES}
    # Ranking reads only in-process state (snapshot, model, visitor row): no store is touched here.
    service = RecommendService(RecommendSettings(exploration={}), cast(RecommendRepository, None))
    for n, u in enumerate(users):
        sequence = histories.sequences[u]
        target = snapshot.index[sequence[-1]]
        seen = {snapshot.index[i] for i in sequence[:-1]}
        anchor = snapshot.index[sequence[-2]]
        for strategy in STRATEGIES:
            # Enough neighbours that K remain after removing what the user already saw.
            found = neighbours(snapshot, [anchor], strategy, limit=K + len(seen))
            ranked = [int(i) for i in found.idx if int(i) not in seen][:K]
            metrics[strategy].add(ranked, target, len(found))
        head = [int(i) for i in popular[: K + len(seen)] if int(i) not in seen][:K]
        metrics["popular"].add(head, target, snapshot.size)
        if model is not None:
            for strategy in STRATEGIES:
                ranked = _served(service, world, model, histories.users[u], sequence[:-1], anchor, strategy)
                metrics[f"{strategy}_personal"].add(ranked, target, len(ranked))
        if n % 2000 == 0:
            report("ranking the test users", n / max(len(users), 1))
    return Item2ItemEvaluation(
        name=name,
        users=len(users),
        items=snapshot.size,
        methods={method: metric.summary() for method, metric in metrics.items()},
    )


def _served(
    service: RecommendService,
    world: FoldedWorld,
    model: RankerModel,
    user: str,
    history: list[str],
    anchor: int,
    strategy: str,
) -> list[int]:
    """The user's item-anchored slot as the service ranks it for a known visitor."""
    context, keys = world.context()
    rank = RankContext(
        snapshot=world.snapshot,
        model=model,
        visitor=world.visitor(user),
        context=context,
        keys=keys,
        rules=RuleContext(context["hour"], None, None, bool(context["is_payday_window"])),
        now=world.at,
        explain=False,
        anchors=(anchor,),
    )
    slot = SlotRequest.model_validate(
        {
            "name": "evaluation",
            "count": K,
            "strategy": strategy,
            "filters": SlotFilters(exclude_items=sorted(seen_filter(history).exclude)),
            "max_per_category": K,  # the published protocol has no diversity quota
        }
    )
    return [int(i) for i in service.rank_slot(slot, rank, set()).idx]


def markdown_rows(result: Item2ItemEvaluation) -> list[str]:
    rows = ["| strategy | HR@10 (95% CI) | NDCG@10 (95% CI) | anchors with ≥10 neighbours |", "|---|---|---|---|"]
    for method, row in result.methods.items():
        rows.append(
            f"| {method} | {row['hr@10']:.4f} ({row['hr@10_ci95_low']:.4f}–{row['hr@10_ci95_high']:.4f}) "
            f"| {row['ndcg@10']:.4f} ({row['ndcg@10_ci95_low']:.4f}–{row['ndcg@10_ci95_high']:.4f}) "
            f"| {row['coverage']:.3f} |"
        )
    return rows
