"""Off-policy evaluation: the click-through rate another ranking would have had, from logged impressions.

Data. The recommend service logs one impression event per placed item with `properties.position` and
`properties.propensity` (the probability of placing that item at that position given the items placed
before it, services/recommend/exploration.py), and, when it explores, `rank` (the item's place in the
deterministic ranked list) and `pool` (how many eligible items it chose from). Impressions of one
(recommendation_id, slot) form a slate; a click that echoes the recommendation id and names a shown item
(within the attribution window) is the reward of that item's position.

Estimand. CTR per impression: the expected number of clicks per slate divided by the slate length. Clicks
at a position depend on the item placed there and on the position, so the value of a target policy π is
Σ_p E_π[r_p]; per-decision importance weighting makes each term unbiased: the reward at position p is
weighted by w_{0:p} = Π_{q≤p} π(a_q | a_<q) / μ(a_q | a_<q) (μ = the logging policy's propensities).

Estimators (generic, on arrays, reused by message OPE): IPS, self-normalised IPS (per stratum, here per
position) and doubly robust with a reward model q̂ (cross-fitted on two visitor folds); 95% intervals from
a cluster-robust variance (clusters = visitors or recommendations), plus the effective sample size
(Σw)²/Σw² and the largest weight, which say how far the target is from the logging policy.

Targets: `model` (the served ranking without exploration: ranks 0, 1, 2, ... of the logged list),
`epsilon:<ε>` (the same ranking with ε-greedy exploration), `uniform` (uniformly random over the logged
pool), `logging` (the logging policy itself: weights 1, a sanity check) and `popular` (global popularity as
of each impression, rebuilt by replaying the event log, with the serving rules). A target can only be
evaluated where the logging policy had support: items outside the logged pool are invisible to it.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import orjson
from pydantic import ValidationError

from services.common.catalog import CatalogItem, ItemKind
from services.common.events import Event, EventType
from services.common.indexes import GLOBAL_CONTEXT, ContextPopularity

Z95 = 1.959963984540054
MAX_POSITIONS = 10  # positions beyond this share one reward-model indicator
# The same weights the profile aggregator folds into the popularity index (services/profile/service.py).
POPULARITY_WEIGHTS = {
    EventType.PRODUCT_VIEW: 1.0,
    EventType.ADD_TO_CART: 3.0,
    EventType.PURCHASE: 5.0,
    EventType.CLICK: 1.5,
}
RECENT_PURCHASES = 20  # the visitor row keeps this many purchased items (services/profile/aggregations.py)


# ------------------------------------------------------------------------------------------------------
# Estimators (generic: arrays of rewards, weights, reward-model values)
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    estimator: str
    value: float
    ci_low: float
    ci_high: float
    se: float
    n: int  # decisions (rows)
    clusters: int
    ess: float
    max_weight: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator,
            "value": self.value,
            "ci95": [self.ci_low, self.ci_high],
            "se": self.se,
            "n": self.n,
            "clusters": self.clusters,
            "ess": self.ess,
            "max_weight": self.max_weight,
        }

    def covers(self, truth: float) -> bool:
        return self.ci_low <= truth <= self.ci_high


def effective_sample_size(weights: np.ndarray) -> float:
    """(Σw)²/Σw²: how many on-policy samples the weighted sample is worth."""
    w = np.asarray(weights, dtype=np.float64)
    squares = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / squares if squares > 0 else 0.0


def cluster_se(influence: np.ndarray, clusters: np.ndarray | None = None) -> tuple[float, int]:
    """Standard error of an estimate whose linearisation is Σ influence, robust to correlation within a
    cluster (e.g. the impressions of one visitor): √(C/(C−1) · Σ_c (Σ_{i∈c} ψ_i)²)."""
    psi = np.asarray(influence, dtype=np.float64)
    sums: np.ndarray
    if clusters is None:
        sums = psi
    else:
        _, inverse = np.unique(clusters, return_inverse=True)
        sums = np.bincount(inverse, weights=psi)
    count = len(sums)
    if count < 2:
        return math.inf, count
    return math.sqrt(count / (count - 1) * float(np.sum(sums * sums))), count


def _estimate(
    name: str, value: float, influence: np.ndarray, clusters: np.ndarray | None, weights: np.ndarray
) -> Estimate:
    se, count = cluster_se(influence, clusters)
    return Estimate(
        name,
        value,
        value - Z95 * se,
        value + Z95 * se,
        se,
        len(influence),
        count,
        effective_sample_size(weights),
        float(np.max(weights)) if len(weights) else 0.0,
    )


def ips(rewards: np.ndarray, weights: np.ndarray, clusters: np.ndarray | None = None) -> Estimate:
    """Inverse propensity scoring: mean of w·r (unbiased when the logging policy covers the target)."""
    r, w = np.asarray(rewards, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    n = len(r)
    if n == 0:
        return Estimate("ips", math.nan, math.nan, math.nan, math.nan, 0, 0, 0.0, 0.0)
    z = w * r
    value = float(z.mean())
    return _estimate("ips", value, (z - value) / n, clusters, w)


def snips(
    rewards: np.ndarray,
    weights: np.ndarray,
    clusters: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> Estimate:
    """Self-normalised IPS: Σw·r/Σw within each stratum (e.g. position), strata averaged by their size.

    Slightly biased, much less variable than IPS when weights are large. A stratum where every weight is 0
    (no support for the target) contributes 0."""
    r, w = np.asarray(rewards, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    n = len(r)
    if n == 0:
        return Estimate("snips", math.nan, math.nan, math.nan, math.nan, 0, 0, 0.0, 0.0)
    groups = np.zeros(n, dtype=np.int64) if strata is None else np.unique(strata, return_inverse=True)[1]
    value = 0.0
    influence = np.zeros(n)
    for g in np.unique(groups):
        rows = groups == g
        total = float(w[rows].sum())
        share = float(rows.sum()) / n
        if total <= 0:
            continue
        stratum_value = float((w[rows] * r[rows]).sum()) / total
        value += share * stratum_value
        influence[rows] = share * w[rows] * (r[rows] - stratum_value) / total
    return _estimate("snips", value, influence, clusters, w)


def doubly_robust(
    rewards: np.ndarray,
    weights: np.ndarray,
    q_logged: np.ndarray,
    q_target: np.ndarray,
    prefix_weights: np.ndarray | None = None,
    clusters: np.ndarray | None = None,
) -> Estimate:
    """Doubly robust: w_prefix·E_π[q̂] + w·(r − q̂(logged action)).

    `q_target` is the reward model's expectation under the target policy at the decision, `q_logged` its
    value for the logged action; `prefix_weights` the weight of the decisions before this one (1 for a
    single decision). Unbiased for any reward model when the propensities are right; a good q̂ only
    lowers the variance."""
    r, w = np.asarray(rewards, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    n = len(r)
    if n == 0:
        return Estimate("dr", math.nan, math.nan, math.nan, math.nan, 0, 0, 0.0, 0.0)
    prefix = np.ones(n) if prefix_weights is None else np.asarray(prefix_weights, dtype=np.float64)
    z = prefix * np.asarray(q_target, dtype=np.float64) + w * (r - np.asarray(q_logged, dtype=np.float64))
    value = float(z.mean())
    return _estimate("dr", value, (z - value) / n, clusters, w)


# ------------------------------------------------------------------------------------------------------
# Logged slates
# ------------------------------------------------------------------------------------------------------


@dataclass
class LoggedSlate:
    recommendation_id: str
    slot: str
    visitor_id: str
    ts: float
    items: list[str]
    propensities: np.ndarray
    ranks: list[int] | None  # None when the service did not log them (exploration off)
    pool: int | None
    rewards: np.ndarray  # 1 where the item at that position was clicked

    @property
    def deterministic(self) -> bool:
        return bool(np.all(self.propensities >= 1.0))

    @property
    def fixed(self) -> int:
        """Leading positions held by merchandiser pins: placed with probability 1 although the pool still
        offered a choice. Every target keeps them (the service places pins first whatever it ranks)."""
        if self.pool is None:
            return 0
        count = 0
        while count < len(self.items) and self.propensities[count] >= 1.0 and self.pool - count > 1:
            count += 1
        return count


@dataclass
class SlateLog:
    slates: list[LoggedSlate] = field(default_factory=list)
    impressions: int = 0
    clicks: int = 0
    clicks_attributed: int = 0
    malformed: int = 0  # slates with missing positions or propensities


@dataclass(frozen=True)
class _Shown:
    """What a slate needs of one impression (kept instead of the event: logs can be large)."""

    item_id: str
    visitor_id: str
    ts: float
    propensity: Any
    rank: Any
    pool: Any


def load_slates(events: Iterable[Event], attribution_window_s: float = 24 * 3600.0) -> SlateLog:
    """Group impressions into slates and attach the clicks that echo their recommendation id."""
    groups: dict[tuple[str, str], dict[int, _Shown]] = {}
    clicks: dict[str, list[tuple[str, Any, float]]] = {}
    log = SlateLog()
    for event in events:
        if event.type is EventType.IMPRESSION and event.recommendation_id and event.item_id:
            log.impressions += 1
            properties = event.properties
            position = properties.get("position")
            key = (event.recommendation_id, str(properties.get("slot", "")))
            shown = _Shown(
                event.item_id,
                event.visitor_id,
                event.ts,
                properties.get("propensity"),
                properties.get("rank"),
                properties.get("pool"),
            )
            if not isinstance(position, int) or isinstance(position, bool):
                position = -1  # marks the slate malformed
            groups.setdefault(key, {})[position] = shown
        elif event.type is EventType.CLICK and event.recommendation_id and event.item_id:
            log.clicks += 1
            clicks.setdefault(event.recommendation_id, []).append(
                (event.item_id, event.properties.get("slot"), event.ts)
            )
    slates: list[LoggedSlate] = []
    for (recommendation_id, slot), by_position in groups.items():
        positions = sorted(by_position)
        if positions != list(range(len(positions))):
            log.malformed += 1
            continue
        shown_items = [by_position[p] for p in positions]
        propensities = [e.propensity for e in shown_items]
        if not all(isinstance(p, int | float) and not isinstance(p, bool) and 0 < p <= 1 for p in propensities):
            log.malformed += 1
            continue
        raw_ranks = [e.rank for e in shown_items]
        ranks = [int(r) for r in raw_ranks] if all(isinstance(r, int) for r in raw_ranks) else None
        pool_value = shown_items[0].pool
        items = [e.item_id for e in shown_items]
        rewards = np.zeros(len(items))
        ts = shown_items[0].ts
        for item_id, click_slot, click_ts in clicks.get(recommendation_id, []):
            if click_slot is not None and str(click_slot) != slot:
                continue
            if not 0 <= click_ts - ts <= attribution_window_s or item_id not in items:
                continue
            position = items.index(item_id)
            if rewards[position] == 0:
                log.clicks_attributed += 1
            rewards[position] = 1.0
        slates.append(
            LoggedSlate(
                recommendation_id,
                slot,
                shown_items[0].visitor_id,
                ts,
                items,
                np.asarray(propensities, dtype=np.float64),
                ranks,
                int(pool_value) if isinstance(pool_value, int) else None,
                rewards,
            )
        )
    slates.sort(key=lambda s: s.ts)
    log.slates = slates
    return log


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
        weight = POPULARITY_WEIGHTS.get(event.type)
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


@dataclass
class FileEvents:
    """Events of a JSON Lines file (optionally gzipped), re-readable; invalid lines are counted and skipped."""

    path: Path
    invalid_lines: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[Event]:
        self.invalid_lines = []
        opener = gzip.open if self.path.suffix == ".gz" else open
        with opener(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield Event.model_validate(orjson.loads(line))
                except (orjson.JSONDecodeError, ValidationError):
                    self.invalid_lines.append(number)


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
