"""The always-valid (peeking-safe) interval for the relative uplift: a confidence sequence, valid at every
look, so a growth team may check the report daily (docs/statistics.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.experiments.stats.intervals import (
    NAN,
    ArmSums,
    Method,
    expm1_capped,
    floor_at_minus_one,
    mean_and_var,
    relative_uplift,
)

DEFAULT_PLANNED_N = 5000
# The always-valid interval is shown once every arm has this many effective events (conversions for a
# 0/1 metric): the asymptotic confidence sequence over-rejects when peeking starts at ~3 conversions.
MIN_EVENTS_PER_ARM = 5.0


@dataclass(frozen=True)
class AlwaysValidResult:
    """Peeking-safe interval for the relative uplift; valid at every look."""

    uplift: float
    ci_lower: float
    ci_upper: float
    std_error: float
    n_total: float
    method: str = ""
    reason: str = ""

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero (NaN intervals, e.g. below the minimum sample, never are)."""
        return self.ci_lower > 0.0 or self.ci_upper < 0.0


def effective_events(sums: ArmSums) -> float:
    """(Σx)²/Σx²: the number of conversions for a 0/1 metric, of buyers for revenue (fewer when a few
    buyers carry most of it), of clicking visitors for clicks. The normal approximation behind the
    always-valid interval needs enough of them, not just enough visitors."""
    if not sums.sum_x2 > 0.0:
        return 0.0
    return sums.sum_x / sums.sum_x2 * sums.sum_x


def confidence_sequence_multiplier(n_total: float, alpha: float, planned_n: float) -> float:
    """Half-width of the always-valid interval in standard errors at N = n_total visitors.

    GrowthBook's asymptotic confidence sequence (Waudby-Smith et al.):
    √N·√(2(Nρ²+1)/(N²ρ²)·ln(√(Nρ²+1)/α)) with ρ² = (−2 ln α + ln(−2 ln α + 1))/N*, tightest near N*.
    """
    log_term = -2.0 * math.log(alpha)
    rho2 = (log_term + math.log(log_term + 1.0)) / planned_n
    n_rho2 = n_total * rho2
    return math.sqrt(n_total) * math.sqrt(
        2.0 * (n_rho2 + 1.0) / (n_total * n_total * rho2) * math.log(math.sqrt(n_rho2 + 1.0) / alpha)
    )


def always_valid_interval(
    control: ArmSums,
    treatment: ArmSums,
    ratio: bool = False,
    alpha: float = 0.05,
    planned_n: float = DEFAULT_PLANNED_N,
    method: Method = "auto",
    min_events: float = MIN_EVENTS_PER_ARM,
) -> AlwaysValidResult:
    """Peeking-safe interval for the relative uplift, on the same scale as `relative_uplift`.

    The confidence-sequence multiplier (see `confidence_sequence_multiplier`, N = nC + nT) replaces the
    fixed-horizon quantile. With the log-ratio scale ("auto" at small samples or low base rates, like the
    fixed interval) the interval is exp(log r ± m·se_log) − 1, so it respects the range (> −100%) and is
    asymmetric like the data; on the delta scale it is uplift ± m·SE, cut at −100% for non-negative metrics.
    The asymptotic sequence does not hold at a handful of events, so no interval is given (NaN, with a
    reason) until every arm has `min_events` effective events (`effective_events`).
    """
    base = relative_uplift(control, treatment, ratio, alpha, method=method)
    n_total = control.n + treatment.n
    if base.reason:
        return AlwaysValidResult(base.uplift, NAN, NAN, base.std_error, n_total, base.method, base.reason)
    if not planned_n > 0:
        return AlwaysValidResult(base.uplift, NAN, NAN, base.std_error, n_total, base.method, "planned_n must be > 0")
    fewest = min(effective_events(control), effective_events(treatment))
    if not fewest >= min_events:
        reason = f"too few events for the always-valid interval ({fewest:.1f} of {min_events:g} in the smallest arm)"
        return AlwaysValidResult(base.uplift, NAN, NAN, base.std_error, n_total, base.method, reason)
    multiplier = confidence_sequence_multiplier(n_total, alpha, planned_n)
    mc, vc = mean_and_var(control, ratio)
    mt, vt = mean_and_var(treatment, ratio)
    if base.method == "log_ratio":
        log_r = math.log(mt) - math.log(mc)
        half = multiplier * math.sqrt(vt / treatment.n / mt / mt + vc / control.n / mc / mc)
        lower, upper = expm1_capped(log_r - half), expm1_capped(log_r + half)
    else:
        half = multiplier * base.std_error
        lower, upper = floor_at_minus_one(base.uplift - half, mc, mt), base.uplift + half
    return AlwaysValidResult(base.uplift, lower, upper, base.std_error, n_total, base.method)
