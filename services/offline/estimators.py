"""Off-policy estimators, generic on arrays (reused by the message OPE, services/messages/ope.py).

IPS, self-normalised IPS (per stratum, e.g. per position) and doubly robust with a reward model q̂; 95%
intervals from a cluster-robust variance (clusters = visitors or recommendations), plus the effective
sample size (Σw)²/Σw² and the largest weight, which say how far the target is from the logging policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054


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
