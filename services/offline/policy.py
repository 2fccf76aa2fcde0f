"""Off-policy evaluation: the click-through rate another ranking would have had, from logged impressions.

Data: the logged slates of slates.py (impressions with their propensities, and the clicks that answer them).

Estimand. CTR per impression: the expected number of clicks per slate divided by the slate length. Clicks
at a position depend on the item placed there and on the position, so the value of a target policy π is
Σ_p E_π[r_p]; per-decision importance weighting makes each term unbiased: the reward at position p is
weighted by w_{0:p} = Π_{q≤p} π(a_q | a_<q) / μ(a_q | a_<q) (μ = the logging policy's propensities).

Estimators: IPS, SNIPS per position and doubly robust (estimators.py), with a reward model q̂ cross-fitted
on two visitor folds (here).

Targets: `model` (the served ranking without exploration: ranks 0, 1, 2, ... of the logged list),
`epsilon:<ε>` (the same ranking with ε-greedy exploration), `uniform` (uniformly random over the logged
pool), `logging` (the logging policy itself: weights 1, a sanity check) and `popular` (global popularity as
of each impression, rebuilt by replaying the event log, with the serving rules). A target can only be
evaluated where the logging policy had support: items outside the logged pool are invisible to it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from services.common.catalog import CatalogItem, ItemKind
from services.common.events import Event, EventType
from services.features.indexes import GLOBAL_CONTEXT, INTERACTION_WEIGHTS, ContextPopularity
from services.offline.estimators import Estimate, doubly_robust, ips, snips
from services.offline.slates import LoggedSlate, SlateLog, load_slates

MAX_POSITIONS = 10  # positions beyond this share one reward-model indicator
RECENT_PURCHASES = 20  # the visitor row keeps this many purchased items (services/features/aggregations.py)


# ------------------------------------------------------------------------------------------------------
# Target policies
# ------------------------------------------------------------------------------------------------------


class RankReward(Protocol):
    """q̂ for one slate: q(position, rank) (rank −1 = unknown), and row(position, n) = q for ranks 0..n−1."""

    def q(self, position: int, rank: int) -> float: ...

    def row(self, position: int, n: int) -> np.ndarray: ...


class TargetPolicy(Protocol):
    @property
    def name(self) -> str: ...

    def supports(self, slate: LoggedSlate) -> bool:
        """Whether the log holds what this target needs for the slate (ranks, pool, its own list)."""

    def probabilities(self, slate: LoggedSlate) -> np.ndarray:
        """π(logged item at p | logged items before p), per position."""

    def expected_reward(self, slate: LoggedSlate, q: RankReward) -> np.ndarray:
        """E_π[q̂(p, rank(a))] at each position given the logged items before it."""


def _ranks(slate: LoggedSlate) -> list[int] | None:
    """Logged ranks; a deterministic slate logged without ranks is the ranked list itself."""
    if slate.ranks is not None:
        return slate.ranks
    return list(range(len(slate.items))) if slate.deterministic else None


def _mean_free(values: np.ndarray, taken: set[int]) -> float:
    """Mean of q̂ over the ranks not placed yet."""
    free = np.ones(len(values), dtype=bool)
    free[[t for t in taken if 0 <= t < len(values)]] = False
    return float(values[free].mean()) if free.any() else 0.0


def _next_rank(taken: set[int]) -> int:
    rank = 0
    while rank in taken:
        rank += 1
    return rank


@dataclass(frozen=True)
class ModelRanking:
    """The served ranking without exploration (epsilon = 0), or with ε-greedy exploration over its pool."""

    epsilon: float = 0.0
    name: str = "model"

    def supports(self, slate: LoggedSlate) -> bool:
        return _ranks(slate) is not None and (self.epsilon == 0.0 or slate.pool is not None)

    def probabilities(self, slate: LoggedSlate) -> np.ndarray:
        ranks = _ranks(slate) or []
        out = np.zeros(len(ranks))
        taken: set[int] = set()
        for p, rank in enumerate(ranks):
            greedy = float(rank == _next_rank(taken))
            if p < slate.fixed:
                out[p] = 1.0
            elif self.epsilon > 0.0:
                remaining = (slate.pool or 0) - p
                out[p] = (1 - self.epsilon) * greedy + (self.epsilon / remaining if remaining > 0 else 0.0)
            else:
                out[p] = greedy
            taken.add(rank)
        return out

    def expected_reward(self, slate: LoggedSlate, q: RankReward) -> np.ndarray:
        ranks = _ranks(slate) or []
        out = np.zeros(len(ranks))
        taken: set[int] = set()
        for p, rank in enumerate(ranks):
            greedy = q.q(p, _next_rank(taken))
            if p < slate.fixed:
                out[p] = q.q(p, rank)
            elif self.epsilon > 0.0 and slate.pool:
                out[p] = (1 - self.epsilon) * greedy + self.epsilon * _mean_free(q.row(p, slate.pool), taken)
            else:
                out[p] = greedy
            taken.add(rank)
        return out


@dataclass(frozen=True)
class UniformRandom:
    """Uniformly random placements from the logged pool (the slot's eligible items)."""

    name: str = "uniform"

    def supports(self, slate: LoggedSlate) -> bool:
        return slate.pool is not None and _ranks(slate) is not None

    def probabilities(self, slate: LoggedSlate) -> np.ndarray:
        pool, fixed = slate.pool or 0, slate.fixed
        return np.array([1.0 if p < fixed else 1.0 / (pool - p) if pool > p else 0.0 for p in range(len(slate.items))])

    def expected_reward(self, slate: LoggedSlate, q: RankReward) -> np.ndarray:
        pool = slate.pool or 0
        ranks = _ranks(slate) or []
        out = np.zeros(len(ranks))
        taken: set[int] = set()
        for p, rank in enumerate(ranks):
            out[p] = q.q(p, rank) if p < slate.fixed else _mean_free(q.row(p, pool), taken)
            taken.add(rank)
        return out


@dataclass(frozen=True)
class LoggingPolicy:
    """The logging policy itself: every weight is 1 (its estimate must equal the observed CTR)."""

    name: str = "logging"

    def supports(self, slate: LoggedSlate) -> bool:
        return True

    def probabilities(self, slate: LoggedSlate) -> np.ndarray:
        return slate.propensities.copy()

    def expected_reward(self, slate: LoggedSlate, q: RankReward) -> np.ndarray:
        # The logged action is a draw from this very policy: q̂ of it is an unbiased one-sample expectation.
        ranks = _ranks(slate) or list(range(len(slate.items)))
        return np.array([q.q(p, r) for p, r in enumerate(ranks)])


@dataclass(frozen=True)
class ItemLists:
    """A deterministic target given by its own ordered list per slate (e.g. most popular as of the time)."""

    lists: Mapping[tuple[str, str], Sequence[str]]
    name: str = "popular"

    def supports(self, slate: LoggedSlate) -> bool:
        return (slate.recommendation_id, slate.slot) in self.lists

    def probabilities(self, slate: LoggedSlate) -> np.ndarray:
        wanted = self.lists[(slate.recommendation_id, slate.slot)]
        out = np.zeros(len(slate.items))
        placed: set[str] = set()
        for p, item in enumerate(slate.items):
            following = next((candidate for candidate in wanted if candidate not in placed), None)
            out[p] = 1.0 if p < slate.fixed else float(item == following)
            placed.add(item)
        return out

    def expected_reward(self, slate: LoggedSlate, q: RankReward) -> np.ndarray:
        # The target's item is usually not in the log, so its rank is unknown: a position-only q̂.
        return np.array([q.q(p, -1) for p in range(len(slate.items))])

    @property
    def position_only(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------------------
# Reward model (cross-fitted) and the evaluation
# ------------------------------------------------------------------------------------------------------


def _fold(visitor_id: str) -> int:
    return hashlib.blake2b(visitor_id.encode(), digest_size=2).digest()[0] & 1


def _features(positions: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    p = np.minimum(positions, MAX_POSITIONS).astype(np.int64)
    onehot = np.zeros((len(p), MAX_POSITIONS + 1))
    onehot[np.arange(len(p)), p] = 1.0
    r = np.maximum(ranks, 0).astype(np.float64)
    return np.column_stack([onehot, np.log1p(r), (r == 0).astype(np.float64), np.log1p(r) ** 2])


class RewardModel:
    """q̂(position, rank): logistic regression on the position and the item's logged rank, with a
    position-only table for targets whose items have no known rank. Fitted per visitor fold and applied
    to the other fold (cross-fitting), so q̂ never saw the rewards it corrects."""

    def __init__(self, slates: Sequence[LoggedSlate]):
        from sklearn.linear_model import LogisticRegression

        # Index f holds what was fitted on the *other* fold, for the slates of fold f.
        self.rank_models: list[Any] = [None, None]
        self.position_ctr: list[np.ndarray] = []
        self._tables: list[np.ndarray] = [np.zeros((0, 0)), np.zeros((0, 0))]
        for fold in (0, 1):
            train = [s for s in slates if _fold(s.visitor_id) != fold]
            positions = np.concatenate([np.arange(len(s.items)) for s in train]) if train else np.zeros(0, np.int64)
            rewards = np.concatenate([s.rewards for s in train]) if train else np.zeros(0)
            capped = np.minimum(positions, MAX_POSITIONS).astype(np.int64)
            clicks = np.bincount(capped, rewards, MAX_POSITIONS + 1)
            shown = np.bincount(capped, None, MAX_POSITIONS + 1)
            overall = (rewards.sum() + 1.0) / (len(rewards) + 20.0)
            self.position_ctr.append((clicks + 20.0 * overall) / (shown + 20.0))
            ranked = [s for s in train if _ranks(s) is not None]
            if ranked:
                pos = np.concatenate([np.arange(len(s.items)) for s in ranked])
                rk = np.concatenate([np.asarray(_ranks(s)) for s in ranked])
                y = np.concatenate([s.rewards for s in ranked])
                if 0 < y.sum() < len(y):
                    model = LogisticRegression(C=1.0, max_iter=500)
                    model.fit(_features(pos, rk), y)
                    self.rank_models[fold] = model

    def table(self, fold: int, positions: int, ranks: int) -> np.ndarray:
        """q̂ for every (position < positions, rank < ranks), computed once per fold and grown on demand."""
        current = self._tables[fold]
        if current.shape[0] >= positions and current.shape[1] >= ranks:
            return current
        shape = (max(positions, current.shape[0], MAX_POSITIONS + 1), max(ranks, current.shape[1], 64))
        model = self.rank_models[fold]
        if model is None:
            table = np.repeat(
                self.position_ctr[fold][np.minimum(np.arange(shape[0]), MAX_POSITIONS)][:, None], shape[1], axis=1
            )
        else:
            p, r = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
            table = model.predict_proba(_features(p.ravel(), r.ravel()))[:, 1].reshape(shape)
        self._tables[fold] = table
        return table

    def for_slate(self, slate: LoggedSlate) -> RankReward:
        return _SlateReward(self, _fold(slate.visitor_id))


@dataclass(frozen=True)
class _SlateReward:
    model: RewardModel
    fold: int

    def q(self, position: int, rank: int) -> float:
        if rank < 0:
            return float(self.model.position_ctr[self.fold][min(position, MAX_POSITIONS)])
        return float(self.model.table(self.fold, position + 1, rank + 1)[position, rank])

    def row(self, position: int, n: int) -> np.ndarray:
        return self.model.table(self.fold, position + 1, n)[position, :n]


@dataclass
class PolicyReport:
    name: str
    slates: int
    skipped: int  # slates the log cannot evaluate this target on (e.g. no ranks or pool logged)
    estimates: dict[str, Estimate]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "slates": self.slates,
            "skipped_slates": self.skipped,
            **{name: estimate.to_dict() for name, estimate in self.estimates.items()},
        }


def evaluate_policies(
    log: SlateLog,
    targets: Sequence[TargetPolicy],
    cluster: Literal["visitor", "recommendation"] = "visitor",
) -> list[PolicyReport]:
    """IPS, SNIPS and DR estimates of each target's CTR per impression on the logged slates."""
    reward_model = RewardModel(log.slates)
    reports = []
    for target in targets:
        used = [s for s in log.slates if target.supports(s)]
        rows: dict[str, list[np.ndarray]] = {k: [] for k in ("r", "w", "pw", "ql", "qt", "cluster", "position")}
        position_only = bool(getattr(target, "position_only", False))
        for slate in used:
            q = reward_model.for_slate(slate)
            ratio = target.probabilities(slate) / slate.propensities
            weights = np.cumprod(ratio)
            prefix = np.concatenate([[1.0], weights[:-1]])
            ranks = _ranks(slate) or list(range(len(slate.items)))
            rows["r"].append(slate.rewards)
            rows["w"].append(weights)
            rows["pw"].append(prefix)
            rows["ql"].append(np.array([q.q(p, -1 if position_only else r) for p, r in enumerate(ranks)]))
            rows["qt"].append(target.expected_reward(slate, q))
            key = slate.visitor_id if cluster == "visitor" else slate.recommendation_id
            rows["cluster"].append(np.array([key] * len(slate.items), dtype=object))
            rows["position"].append(np.arange(len(slate.items)))
        if not used:
            reports.append(PolicyReport(target.name, 0, len(log.slates), {}))
            continue
        r, w, pw = (np.concatenate(rows[k]) for k in ("r", "w", "pw"))
        ql, qt = np.concatenate(rows["ql"]), np.concatenate(rows["qt"])
        clusters = np.concatenate(rows["cluster"]).astype(str)
        positions = np.concatenate(rows["position"])
        estimates = {
            "ips": ips(r, w, clusters),
            "snips": snips(r, w, clusters, positions),
            "dr": doubly_robust(r, w, ql, qt, pw, clusters),
        }
        reports.append(PolicyReport(target.name, len(used), len(log.slates) - len(used), estimates))
    return reports


def logged_ctr(log: SlateLog) -> float:
    impressions = sum(len(s.items) for s in log.slates)
    return float(sum(s.rewards.sum() for s in log.slates)) / impressions if impressions else math.nan


# ------------------------------------------------------------------------------------------------------
# "Most popular" as of each impression, rebuilt from the event log
# ------------------------------------------------------------------------------------------------------


def popular_lists(
    slates: Sequence[LoggedSlate],
    events: Iterable[Event],
    catalog: Sequence[CatalogItem],
    max_per_category: int | None = 4,
) -> dict[tuple[str, str], list[str]]:
    """For each slate, the most popular available products as of its time (decayed global popularity,
    as the serving index computes it), without the visitor's recent purchases, at most `max_per_category`
    per category: the slate a "most popular" policy would have shown. `events` in time order."""
    products = {item.item_id: item for item in catalog if item.kind is ItemKind.PRODUCT and item.active}
    popularity = ContextPopularity()
    purchased: dict[str, list[str]] = {}
    pending = sorted(slates, key=lambda s: s.ts)
    out: dict[tuple[str, str], list[str]] = {}
    at = 0

    def emit_until(ts: float) -> None:
        nonlocal at
        while at < len(pending) and pending[at].ts <= ts:
            slate = pending[at]
            out[(slate.recommendation_id, slate.slot)] = _popular_slate(
                popularity, slate, products, purchased.get(slate.visitor_id, []), max_per_category
            )
            at += 1

    for event in events:
        emit_until(event.ts - 1e-9)
        # The weights the aggregator folds into the popularity index: one place (services/features/indexes.py).
        weight = INTERACTION_WEIGHTS.get(event.type)
        if weight is None or not event.item_id:
            continue
        popularity.observe([GLOBAL_CONTEXT], event.item_id, weight, event.ts)
        if event.type is EventType.PURCHASE:
            bought = purchased.setdefault(event.visitor_id, [])
            if event.item_id in bought:
                bought.remove(event.item_id)
            bought.insert(0, event.item_id)
            del bought[RECENT_PURCHASES:]
    emit_until(math.inf)
    return out


def _popular_slate(
    popularity: ContextPopularity,
    slate: LoggedSlate,
    products: Mapping[str, CatalogItem],
    purchased: Sequence[str],
    max_per_category: int | None,
) -> list[str]:
    bought = set(purchased)
    per_category: dict[str, int] = {}
    chosen: list[str] = []
    ranked = [
        item for item, _ in popularity.top(GLOBAL_CONTEXT, slate.ts, len(popularity.scores.get(GLOBAL_CONTEXT, {})))
    ]
    for item_id in ranked:
        item = products.get(item_id)
        if item is None or not item.in_stock or item_id in bought:
            continue
        if max_per_category is not None and item.category is not None:
            if per_category.get(item.category, 0) >= max_per_category:
                continue
            per_category[item.category] = per_category.get(item.category, 0) + 1
        chosen.append(item_id)
        if len(chosen) >= len(slate.items):
            break
    return chosen


def parse_targets(names: Sequence[str], popular: Mapping[tuple[str, str], Sequence[str]] | None) -> list[TargetPolicy]:
    """`model`, `epsilon:0.1`, `uniform`, `logging`, `popular` -> target policies."""
    targets: list[TargetPolicy] = []
    for name in names:
        if name == "model":
            targets.append(ModelRanking())
        elif name.startswith("epsilon:"):
            epsilon = float(name.split(":", 1)[1])
            if not 0 < epsilon <= 1:
                raise ValueError("epsilon must be in (0, 1]")
            targets.append(ModelRanking(epsilon, name))
        elif name == "uniform":
            targets.append(UniformRandom())
        elif name == "logging":
            targets.append(LoggingPolicy())
        elif name == "popular":
            if popular is None:
                raise ValueError("the popular target needs the event log and the catalog")
            targets.append(ItemLists(popular))
        else:
            raise ValueError(f"unknown target policy {name!r} (model, epsilon:<e>, uniform, logging, popular)")
    return targets


# ------------------------------------------------------------------------------------------------------
# From a file of logged events to a report
# ------------------------------------------------------------------------------------------------------


def evaluate_file(
    events: Iterable[Event],
    targets: Sequence[str],
    catalog: Sequence[CatalogItem],
    history: Iterable[Event] | None = None,
    cluster: Literal["visitor", "recommendation"] = "visitor",
    attribution_window_s: float = 24 * 3600.0,
    max_per_category: int | None = 4,
) -> dict[str, Any]:
    """The whole `selaras evaluate policy`: slates from `events`, "most popular" replayed from `history`
    (default: the same events), estimates for each target. Raises ValueError on an unusable log."""
    log = load_slates(events, attribution_window_s)
    if not log.slates:
        raise ValueError(f"no usable slates: {log.impressions} impressions, {log.malformed} malformed slates")
    popular = None
    if "popular" in targets:
        if not catalog:
            raise ValueError("the popular target needs the catalog (import it into the data directory)")
        popular = popular_lists(log.slates, events if history is None else history, catalog, max_per_category)
    reports = evaluate_policies(log, parse_targets(targets, popular), cluster)
    return {
        "slates": len(log.slates),
        "impressions": log.impressions,
        "clicks": log.clicks,
        "clicks_attributed": log.clicks_attributed,
        "malformed_slates": log.malformed,
        "explored_slates": sum(1 for s in log.slates if not s.deterministic),
        "logged_ctr": logged_ctr(log),
        "cluster": cluster,
        "policies": [report.to_dict() for report in reports],
    }
