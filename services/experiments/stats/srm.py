"""Sample-ratio mismatch: is the split of visitors over the arms the configured one? A failed check means
assignment or logging is broken, and no uplift of the experiment can be trusted."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special

NAN = math.nan
SRM_P_THRESHOLD = 0.001
SRM_MIN_EXPECTED_PER_ARM = 8.0


def srm_check(counts: Sequence[float], weights: Sequence[float]) -> tuple[float, float, bool]:
    """Sample-ratio mismatch: (chi2, p_value, flagged) against the configured weights.

    Flags at p < 0.001 once every arm expects >= 8 visitors (where the chi-square approximation
    holds); expected counts are used rather than observed so a dead arm with 0 visitors is flagged.
    Arms with zero weight are left out. Invalid input gives (NaN, NaN, False).
    """
    c = np.asarray(counts, dtype=float).ravel()
    w = np.asarray(weights, dtype=float).ravel()
    if c.shape != w.shape or not (np.all(np.isfinite(c)) and np.all(np.isfinite(w))):
        return NAN, NAN, False
    if np.any(c < 0) or np.any(w < 0):
        return NAN, NAN, False
    keep = w > 0
    c, w = c[keep], w[keep]
    total = float(c.sum())
    if c.size < 2 or total <= 0:
        return NAN, NAN, False
    expected = total * w / w.sum()
    chi2 = float(np.sum((c - expected) ** 2 / expected))
    p_value = float(special.chdtrc(c.size - 1, chi2))
    flagged = p_value < SRM_P_THRESHOLD and float(expected.min()) >= SRM_MIN_EXPECTED_PER_ARM
    return chi2, p_value, flagged
