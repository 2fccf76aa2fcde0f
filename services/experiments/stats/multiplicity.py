"""Multiple-testing corrections: Holm across goal metrics × arms, Benjamini–Hochberg across segments."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

NAN = math.nan


def _finite_family(p_values: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    p = np.asarray(p_values, dtype=float).ravel()
    # NaN p-values (degenerate comparisons) are not tests: they neither count in the family size
    # nor get rejected.
    return p, np.isfinite(p)


def benjamini_hochberg(p_values: ArrayLike, q: float = 0.05) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """BH step-up adjusted p-values and the reject mask at FDR q (used across segments)."""
    p, valid = _finite_family(p_values)
    adjusted = np.full(p.shape, NAN)
    pv = np.clip(p[valid], 0.0, 1.0)
    m = pv.size
    if m:
        order = np.argsort(pv)
        scaled = pv[order] * m / np.arange(1, m + 1)
        # Step-up: each adjusted value is the min over all larger ranks.
        adj_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
        adj = np.empty(m)
        adj[order] = adj_sorted
        adjusted[valid] = adj
    reject = np.zeros(p.shape, dtype=bool)
    reject[valid] = adjusted[valid] <= q
    return adjusted, reject


def holm(p_values: ArrayLike, alpha: float = 0.05) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Holm step-down adjusted p-values and reject mask at FWER alpha (goal metrics × arms)."""
    p, valid = _finite_family(p_values)
    adjusted = np.full(p.shape, NAN)
    pv = np.clip(p[valid], 0.0, 1.0)
    m = pv.size
    if m:
        order = np.argsort(pv)
        scaled = pv[order] * (m - np.arange(m))
        # Step-down: adjusted values are monotone non-decreasing in rank.
        adj_sorted = np.minimum(np.maximum.accumulate(scaled), 1.0)
        adj = np.empty(m)
        adj[order] = adj_sorted
        adjusted[valid] = adj
    reject = np.zeros(p.shape, dtype=bool)
    reject[valid] = adjusted[valid] <= alpha
    return adjusted, reject
