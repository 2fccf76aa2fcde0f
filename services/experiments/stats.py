"""Experiment statistics from per-arm sufficient statistics (pure numpy/scipy, no I/O).

Unit of randomization and analysis is the visitor: every sum below is over visitors, with x the
visitor's metric value (or numerator, e.g. clicks) and y the denominator of a ratio metric
(e.g. impressions). Degenerate inputs never raise: results carry NaN fields and a `reason`.
The methods, their switches and the simulations that calibrate them are described in docs/statistics.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special

NAN = math.nan
# Below these the delta-method interval for a relative uplift under-covers (91.9% nominal-95% at
# p=2%, 500/arm), so "auto" switches to the log-ratio interval.
SMALL_SAMPLE_PER_ARM = 5000
LOW_BASE_RATE = 0.02
DEFAULT_PLANNED_N = 5000
# The always-valid interval is shown once every arm has this many effective events (conversions for a
# 0/1 metric): the asymptotic confidence sequence over-rejects when peeking starts at ~3 conversions.
MIN_EVENTS_PER_ARM = 5.0
SRM_P_THRESHOLD = 0.001
SRM_MIN_EXPECTED_PER_ARM = 8.0

Method = Literal["auto", "delta", "log_ratio"]


@dataclass(frozen=True)
class ArmSums:
    """Sufficient statistics of one arm for one metric; all fields are additive across shards."""

    n: float = 0.0
    sum_x: float = 0.0
    sum_x2: float = 0.0
    sum_y: float = 0.0
    sum_y2: float = 0.0
    sum_xy: float = 0.0

    def merge(self, other: ArmSums) -> ArmSums:
        """Sums of the union of two disjoint visitor sets (e.g. two shards or two days)."""
        return ArmSums(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __add__(self, other: ArmSums) -> ArmSums:
        return self.merge(other)

    def apply(self, increments: Mapping[str, float]) -> ArmSums:
        """Add an increment dict (as returned by `update_increments`)."""
        return self.merge(ArmSums(**increments))

    @classmethod
    def from_values(cls, x: ArrayLike, y: ArrayLike | None = None) -> ArmSums:
        """Batch sums from per-visitor values (y = per-visitor denominators for ratio metrics)."""
        xs = np.asarray(x, dtype=float).ravel()
        ys = np.zeros_like(xs) if y is None else np.asarray(y, dtype=float).ravel()
        if xs.shape != ys.shape:
            raise ValueError(f"x and y must have the same length, got {xs.size} and {ys.size}")
        return cls(
            n=float(xs.size),
            sum_x=float(xs.sum()),
            sum_x2=float(np.dot(xs, xs)),
            sum_y=float(ys.sum()),
            sum_y2=float(np.dot(ys, ys)),
            sum_xy=float(np.dot(xs, ys)),
        )

    @staticmethod
    def update_increments(
        x_old: float, y_old: float, dx: float, dy: float = 0.0, new_visitor: bool = False
    ) -> dict[str, float]:
        """Increments to the sums when one visitor's running (x, y) becomes (x+dx, y+dy).

        The visitor's running x, y live in Redis; only these deltas touch the shared sums, and for
        non-negative metrics with non-negative deltas every increment is >= 0 (Prometheus counters).
        """
        return {
            "n": 1.0 if new_visitor else 0.0,
            "sum_x": dx,
            "sum_x2": 2.0 * x_old * dx + dx * dx,
            "sum_y": dy,
            "sum_y2": 2.0 * y_old * dy + dy * dy,
            "sum_xy": x_old * dy + y_old * dx + dx * dy,
        }


def _sample_var(sum_sq: float, total: float, n: float) -> float:
    # Clamp tiny negative values caused by cancellation in sum_sq - total^2/n.
    return max((sum_sq - total * total / n) / (n - 1.0), 0.0)


def mean_and_var(sums: ArmSums, ratio: bool) -> tuple[float, float]:
    """Per-visitor mean (or ratio of means) and per-visitor variance; Var(estimate) = var / n.

    For a ratio metric R = mean(x)/mean(y) the variance is the delta-method one:
    (var_x - 2 R cov_xy + R^2 var_y) / mean(y)^2. NaN where undefined (n < 2, zero denominator).
    """
    n = sums.n
    if not n > 0:
        return NAN, NAN
    mean_x = sums.sum_x / n
    if ratio:
        mean_y = sums.sum_y / n
        if mean_y == 0.0:
            return NAN, NAN
        r = mean_x / mean_y
        if n < 2:
            return r, NAN
        var_x = _sample_var(sums.sum_x2, sums.sum_x, n)
        var_y = _sample_var(sums.sum_y2, sums.sum_y, n)
        cov_xy = (sums.sum_xy - sums.sum_x * sums.sum_y / n) / (n - 1.0)
        # Chained division: mean_y * mean_y can underflow to 0 for tiny denominators.
        return r, max((var_x - 2.0 * r * cov_xy + r * r * var_y) / mean_y / mean_y, 0.0)
    if n < 2:
        return mean_x, NAN
    return mean_x, _sample_var(sums.sum_x2, sums.sum_x, n)


@dataclass(frozen=True)
class UpliftResult:
    """Treatment vs control comparison; `reason` is empty when the numbers are valid."""

    uplift: float
    ci_lower: float
    ci_upper: float
    p_value: float
    std_error: float
    df: float
    method: str
    chance_to_win: float
    control_mean: float
    treatment_mean: float
    reason: str = ""

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero (NaN intervals are never significant)."""
        return self.ci_lower > 0.0 or self.ci_upper < 0.0


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


def _invalid(method: str, control_mean: float, treatment_mean: float, reason: str) -> UpliftResult:
    return UpliftResult(NAN, NAN, NAN, NAN, NAN, NAN, method, NAN, control_mean, treatment_mean, reason)


def _expm1(v: float) -> float:
    # math.exp raises OverflowError past ~709; an unbounded interval end is just +inf.
    return math.inf if v > 700.0 else math.expm1(v)


def _welch_df(var_a: float, n_a: float, var_b: float, n_b: float) -> float:
    """Welch–Satterthwaite df for an estimate whose variance is var_a + var_b."""
    denom = var_a * var_a / (n_a - 1.0) + var_b * var_b / (n_b - 1.0)
    if not denom > 0.0:
        return NAN
    total = var_a + var_b
    return total * total / denom


def _input_problem(control: ArmSums, treatment: ArmSums, alpha: float, ratio: bool) -> str:
    if not 0.0 < alpha < 1.0:
        return f"alpha must be in (0, 1), got {alpha}"
    if not (control.n >= 2 and treatment.n >= 2):
        return f"need at least 2 visitors per arm (control n={control.n:g}, treatment n={treatment.n:g})"
    if ratio and (control.sum_y == 0.0 or treatment.sum_y == 0.0):
        return "zero denominator total in an arm"
    return ""


def _t_test(
    estimate: float, var_t: float, n_t: float, var_c: float, n_c: float, alpha: float
) -> tuple[float, float, float, float, float]:
    """Welch t on an estimate with variance var_t + var_c: (se, df, q, p, normal chance_to_win)."""
    se = math.sqrt(var_t + var_c)
    df = _welch_df(var_t, n_t, var_c, n_c)
    if not (se > 0.0 and math.isfinite(df)):
        return se, df, NAN, NAN, NAN
    q = float(special.stdtrit(df, 1.0 - alpha / 2.0))
    z = estimate / se
    p = 2.0 * float(special.stdtr(df, -abs(z)))
    return se, df, q, p, float(special.ndtr(z))


def _choose_method(method: Method, mc: float, mt: float, nc: float, nt: float) -> str:
    """The interval scale actually used: "auto" takes the log ratio at small samples or low base rates."""
    if method != "auto":
        return method
    small = min(nc, nt) < SMALL_SAMPLE_PER_ARM or 0.0 < mc < LOW_BASE_RATE
    # The log ratio needs both means positive; otherwise the delta interval is all we have.
    return "log_ratio" if small and mc > 0.0 and mt > 0.0 else "delta"


def _floor_at_minus_one(lower: float, mc: float, mt: float) -> float:
    # A metric that cannot be negative cannot fall by more than 100%: the symmetric delta interval may
    # reach below -1, which is outside the parameter space, so it is cut there (coverage can only grow).
    return max(lower, -1.0) if mc > 0.0 and mt >= 0.0 else lower


def relative_uplift(
    control: ArmSums,
    treatment: ArmSums,
    ratio: bool = False,
    alpha: float = 0.05,
    method: Method = "auto",
) -> UpliftResult:
    """Relative uplift (mT - mC)/|mC| with a Welch t interval and p-value.

    "delta": delta-method variance on the relative scale. "log_ratio": interval
    r·exp(±q·se_log) - 1 on the log of r = mT/mC (needs positive means). "auto" uses log-ratio under
    ~5k visitors per arm or a control rate < 2%, where the delta interval under-covers.
    std_error is always the delta-method SE of the relative uplift; chance_to_win assumes higher is better.
    With non-negative means the interval never goes below -100%.
    """
    mc, vc = mean_and_var(control, ratio)
    mt, vt = mean_and_var(treatment, ratio)
    problem = _input_problem(control, treatment, alpha, ratio)
    if problem:
        return _invalid(method, mc, mt, problem)
    if mc == 0.0:
        return _invalid(method, mc, mt, "zero control mean: relative uplift undefined")
    if method not in ("auto", "delta", "log_ratio"):
        return _invalid(method, mc, mt, f"unknown method {method!r}")
    nc, nt = control.n, treatment.n
    uplift = (mt - mc) / abs(mc)
    # Delta method: Var(Δr) = σT²/(nT μC²) + σC² μT²/(nC μC⁴), written as chained divisions so
    # extreme means overflow to inf/NaN instead of raising (float ** raises, / does not).
    ratio_tc = mt / mc
    var_t_delta = vt / nt / mc / mc
    var_c_delta = vc / nc * ratio_tc * ratio_tc / mc / mc
    delta_se = math.sqrt(var_t_delta + var_c_delta)

    chosen = _choose_method(method, mc, mt, nc, nt)
    if chosen == "log_ratio" and not (mc > 0.0 and mt > 0.0):
        return _invalid(method, mc, mt, "log-ratio interval needs positive means in both arms")

    if chosen == "delta":
        se, df, q, p, ctw = _t_test(uplift, var_t_delta, nt, var_c_delta, nc, alpha)
        lower, upper = _floor_at_minus_one(uplift - q * se, mc, mt), uplift + q * se
    else:
        log_r = math.log(mt) - math.log(mc)
        se, df, q, p, ctw = _t_test(log_r, vt / nt / mt / mt, nt, vc / nc / mc / mc, nc, alpha)
        lower, upper = _expm1(log_r - q * se), _expm1(log_r + q * se)
    reason = "" if se > 0.0 and math.isfinite(p) else "zero or undefined variance"
    return UpliftResult(uplift, lower, upper, p, delta_se, df, chosen, ctw, mc, mt, reason)


def absolute_difference(control: ArmSums, treatment: ArmSums, ratio: bool = False, alpha: float = 0.05) -> UpliftResult:
    """Welch t-test on mT - mC (same as scipy.stats.ttest_ind(equal_var=False) for means)."""
    mc, vc = mean_and_var(control, ratio)
    mt, vt = mean_and_var(treatment, ratio)
    problem = _input_problem(control, treatment, alpha, ratio)
    if problem:
        return _invalid("welch_absolute", mc, mt, problem)
    diff = mt - mc
    se, df, q, p, ctw = _t_test(diff, vt / treatment.n, treatment.n, vc / control.n, control.n, alpha)
    reason = "" if se > 0.0 and math.isfinite(p) else "zero or undefined variance"
    return UpliftResult(diff, diff - q * se, diff + q * se, p, se, df, "welch_absolute", ctw, mc, mt, reason)


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
        lower, upper = _expm1(log_r - half), _expm1(log_r + half)
    else:
        half = multiplier * base.std_error
        lower, upper = _floor_at_minus_one(base.uplift - half, mc, mt), base.uplift + half
    return AlwaysValidResult(base.uplift, lower, upper, base.std_error, n_total, base.method)


# ------------------------------------------------------------------------------------------------
# Heavy tails: revenue capped at a pre-registered quantile, from additive log-bucket histograms
# ------------------------------------------------------------------------------------------------

# Each positive per-visitor value falls in bucket k = ceil(4·log2(x)), i.e. (2^((k-1)/4), 2^(k/4)]: four
# buckets per doubling (19% wide), any currency scale. Per bucket the store keeps the number of visitors
# and their Σx, Σx² (services/experiments/store/base.py, same bucket expression), so capped sums can be
# computed for any cap on a bucket edge after the fact.
BUCKETS_PER_DOUBLING = 4
# Pre-registered before any data: revenue is capped at the 90th percentile of the positive per-visitor
# values, pooled over the compared arms (blind to the arm); at 3% conversion that is the 99.7th percentile
# of all visitors. With ~60 buyers per arm and log-normal order values (σ = 1–1.5), 6,000 simulated runs
# gave A/A false positives 5.1–5.3% and coverage 94.3–94.9%; the uncapped mean gave 6.3–8.2% and
# 90.5–94.9% in 2,000-run checks (a 0.95 cap gave 5.8% at σ = 1.5). See tests/experiments/test_stats.py
# and docs/statistics.md.
CAP_QUANTILE = 0.9

# bucket index -> (visitors, Σx, Σx²) of the visitors whose value falls in the bucket.
Histogram = Mapping[int, tuple[float, float, float]]


def bucket_upper_edge(k: int) -> float:
    return float(2.0 ** (k / BUCKETS_PER_DOUBLING))


def histogram_from_values(x: ArrayLike) -> dict[int, tuple[float, float, float]]:
    """Batch histogram of per-visitor values (zeros and negatives are not in any bucket)."""
    xs = np.asarray(x, dtype=float).ravel()
    xs = xs[xs > 0]
    if xs.size == 0:
        return {}
    ks = np.ceil(BUCKETS_PER_DOUBLING * np.log(xs) / math.log(2.0)).astype(np.int64)
    offset = ks - ks.min()
    counts = np.bincount(offset)
    sx = np.bincount(offset, weights=xs)
    sx2 = np.bincount(offset, weights=xs * xs)
    first = int(ks.min())
    return {first + int(i): (float(counts[i]), float(sx[i]), float(sx2[i])) for i in np.flatnonzero(counts)}


def histogram_cap(histograms: Sequence[Histogram], quantile: float = CAP_QUANTILE) -> float:
    """Upper edge of the bucket holding the pooled `quantile` of the positive values (inf if none).

    Rounding up to the bucket edge puts the cap at most 19% above the exact quantile.
    """
    pooled: dict[int, float] = {}
    for histogram in histograms:
        for k, (count, _sx, _sx2) in histogram.items():
            pooled[k] = pooled.get(k, 0.0) + count
    total = sum(c for c in pooled.values() if c > 0)
    if not total > 0:
        return math.inf
    running = 0.0
    for k in sorted(pooled):
        running += max(pooled[k], 0.0)
        # A tiny tolerance: counts are exact integers, the product q·total need not be.
        if running >= quantile * total - 1e-9:
            return bucket_upper_edge(k)
    return math.inf


def capped_sums(sums: ArmSums, histogram: Histogram, cap: float) -> ArmSums:
    """The arm's sums with every visitor's value replaced by min(x, cap), for a cap on a bucket edge.

    Visitors with x <= 0 (no purchase) are unchanged; buckets above the cap contribute cap and cap².
    """
    if math.isinf(cap):
        return sums
    sum_x = sum_x2 = 0.0
    for k, (count, sx, sx2) in histogram.items():
        # A bucket a visitor has left keeps float residue of its ± increments; an empty bucket is zero.
        if count < 0.5:
            continue
        if bucket_upper_edge(k) <= cap:
            sum_x += sx
            sum_x2 += sx2
        else:
            sum_x += count * cap
            sum_x2 += count * cap * cap
    # Values <= 0 are in no bucket: keep their share of the sums (zero for revenue).
    positive_x = sum(sx for count, sx, _ in histogram.values() if count >= 0.5)
    positive_x2 = sum(sx2 for count, _, sx2 in histogram.values() if count >= 0.5)
    return ArmSums(
        n=sums.n,
        sum_x=sums.sum_x - positive_x + sum_x,
        sum_x2=sums.sum_x2 - positive_x2 + sum_x2,
        sum_y=sums.sum_y,
        sum_y2=sums.sum_y2,
        sum_xy=sums.sum_xy,
    )


# bucket index -> (visitors with a pre-period, their Σc, Σc·x, Σx): CUPED on capped values.
CovariateHistogram = Mapping[int, tuple[float, float, float, float]]


def covariate_histogram_from_values(
    y: ArrayLike, c: ArrayLike, new: ArrayLike | None = None
) -> dict[int, tuple[float, float, float, float]]:
    """Batch covariate histogram: buckets of y (as histogram_from_values), visitors with a pre-period only."""
    ys = np.asarray(y, dtype=float).ravel()
    is_new = np.zeros(ys.shape, dtype=bool) if new is None else np.asarray(new, dtype=bool).ravel()
    cs = np.asarray(c, dtype=float).ravel()
    keep = (ys > 0) & ~is_new
    ys, cs = ys[keep], cs[keep]
    if ys.size == 0:
        return {}
    ks = np.ceil(BUCKETS_PER_DOUBLING * np.log(ys) / math.log(2.0)).astype(np.int64)
    offset = ks - ks.min()
    count, sum_c = np.bincount(offset), np.bincount(offset, cs)
    sum_cx, sum_x = np.bincount(offset, cs * ys), np.bincount(offset, ys)
    first = int(ks.min())
    return {
        first + int(i): (float(count[i]), float(sum_c[i]), float(sum_cx[i]), float(sum_x[i]))
        for i in np.flatnonzero(count)
    }


def capped_cuped_sums(
    sums: CupedSums, histogram: Histogram, covariate_histogram: CovariateHistogram, cap: float
) -> CupedSums:
    """CupedSums with every visitor's y replaced by min(y, cap), for a cap on a bucket edge.

    Σc·y and the pre-period visitors' Σy are rebuilt per bucket like `capped_sums` (buckets above the
    cap contribute cap·Σc and cap·count); the covariate itself is not capped (pass a bounded predictor,
    e.g. log(1 + pre-period revenue), if it is heavy-tailed).
    """
    if math.isinf(cap):
        return sums
    capped = capped_sums(sums.metric(), histogram, cap)
    bucketed_cx = bucketed_xp = capped_cx = capped_xp = 0.0
    for k, (count, sum_c, sum_cx, sum_x) in covariate_histogram.items():
        bucketed_cx += sum_cx
        bucketed_xp += sum_x
        if bucket_upper_edge(k) <= cap:
            capped_cx += sum_cx
            capped_xp += sum_x
        else:
            capped_cx += cap * sum_c
            capped_xp += cap * count
    pre_period_y = (sums.sum_y - sums.sum_y_new) - bucketed_xp + capped_xp
    return CupedSums(
        n=sums.n,
        sum_y=capped.sum_x,
        sum_y2=capped.sum_x2,
        sum_x=sums.sum_x,
        sum_x2=sums.sum_x2,
        sum_xy=sums.sum_xy - bucketed_cx + capped_cx,
        n_new=sums.n_new,
        sum_y_new=capped.sum_x - pre_period_y,
    )


# ------------------------------------------------------------------------------------------------
# CUPED / regression adjustment from additive per-arm sums
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CupedSums:
    """Per-arm sums for regression adjustment of a per-visitor metric y on a pre-exposure covariate x.

    x is the visitor's pre-period value of the metric (or a predictor of it) as of the first exposure;
    visitors without a pre-period (new visitors) have x = 0 and count in `n_new`, with `sum_y_new` the sum
    of their y: the regression gets a new-visitor indicator instead of dropping them (its cross-product
    with x is 0 because their x is 0). Every field is additive across shards and days.
    """

    n: float = 0.0
    sum_y: float = 0.0
    sum_y2: float = 0.0
    sum_x: float = 0.0
    sum_x2: float = 0.0
    sum_xy: float = 0.0
    n_new: float = 0.0
    sum_y_new: float = 0.0

    def merge(self, other: CupedSums) -> CupedSums:
        return CupedSums(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __add__(self, other: CupedSums) -> CupedSums:
        return self.merge(other)

    @classmethod
    def from_values(cls, y: ArrayLike, x: ArrayLike, new: ArrayLike | None = None) -> CupedSums:
        """Batch sums; `new` marks visitors without a pre-period (their x is taken as 0)."""
        ys = np.asarray(y, dtype=float).ravel()
        is_new = np.zeros(ys.shape, dtype=bool) if new is None else np.asarray(new, dtype=bool).ravel()
        xs = np.where(is_new, 0.0, np.asarray(x, dtype=float).ravel())
        if not (xs.shape == ys.shape == is_new.shape):
            raise ValueError("y, x and new must have the same length")
        return cls(
            n=float(ys.size),
            sum_y=float(ys.sum()),
            sum_y2=float(np.dot(ys, ys)),
            sum_x=float(xs.sum()),
            sum_x2=float(np.dot(xs, xs)),
            sum_xy=float(np.dot(xs, ys)),
            n_new=float(is_new.sum()),
            sum_y_new=float(ys[is_new].sum()),
        )

    def metric(self) -> ArmSums:
        """The metric's own sums (what the unadjusted comparison uses)."""
        return ArmSums(n=self.n, sum_x=self.sum_y, sum_x2=self.sum_y2)


@dataclass(frozen=True)
class RatioCupedSums:
    """Per-arm sums for regression adjustment of a ratio metric ΣM/ΣD (e.g. clicks / impressions).

    The ratio is linearised per visitor, L = (m − R·d)/d̄ (the delta method: Var(R̂) = var(L)/n), and L is
    regressed on the covariate x (and the new-visitor indicator) like a plain metric. That needs the
    cross-sums of x with the numerator and the denominator (Σxm, Σxd) and the new visitors' Σm, Σd.
    """

    n: float = 0.0
    sum_m: float = 0.0
    sum_m2: float = 0.0
    sum_d: float = 0.0
    sum_d2: float = 0.0
    sum_md: float = 0.0
    sum_x: float = 0.0
    sum_x2: float = 0.0
    sum_xm: float = 0.0
    sum_xd: float = 0.0
    n_new: float = 0.0
    sum_m_new: float = 0.0
    sum_d_new: float = 0.0

    def merge(self, other: RatioCupedSums) -> RatioCupedSums:
        return RatioCupedSums(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __add__(self, other: RatioCupedSums) -> RatioCupedSums:
        return self.merge(other)

    @classmethod
    def from_values(cls, m: ArrayLike, d: ArrayLike, x: ArrayLike, new: ArrayLike | None = None) -> RatioCupedSums:
        ms = np.asarray(m, dtype=float).ravel()
        ds = np.asarray(d, dtype=float).ravel()
        is_new = np.zeros(ms.shape, dtype=bool) if new is None else np.asarray(new, dtype=bool).ravel()
        xs = np.where(is_new, 0.0, np.asarray(x, dtype=float).ravel())
        if not (ms.shape == ds.shape == xs.shape == is_new.shape):
            raise ValueError("m, d, x and new must have the same length")
        return cls(
            n=float(ms.size),
            sum_m=float(ms.sum()),
            sum_m2=float(np.dot(ms, ms)),
            sum_d=float(ds.sum()),
            sum_d2=float(np.dot(ds, ds)),
            sum_md=float(np.dot(ms, ds)),
            sum_x=float(xs.sum()),
            sum_x2=float(np.dot(xs, xs)),
            sum_xm=float(np.dot(xs, ms)),
            sum_xd=float(np.dot(xs, ds)),
            n_new=float(is_new.sum()),
            sum_m_new=float(ms[is_new].sum()),
            sum_d_new=float(ds[is_new].sum()),
        )

    def metric(self) -> ArmSums:
        return ArmSums(
            n=self.n, sum_x=self.sum_m, sum_x2=self.sum_m2, sum_y=self.sum_d, sum_y2=self.sum_d2, sum_xy=self.sum_md
        )


@dataclass(frozen=True)
class CupedResult:
    """Adjusted and unadjusted comparisons side by side.

    `adjusted_control`/`adjusted_treatment` are sums with each arm's adjusted mean and residual variance,
    so any comparison of this module (fixed or always-valid) can run on them. `variance_reduction` is
    1 − Var(adjusted difference)/Var(unadjusted difference): interval widths shrink by √(1 − it).
    """

    adjusted: UpliftResult
    unadjusted: UpliftResult
    adjusted_difference: UpliftResult
    theta: tuple[float, float]
    variance_reduction: float
    adjusted_control: ArmSums
    adjusted_treatment: ArmSums
    reason: str = ""


@dataclass(frozen=True)
class _Moments:
    """One arm, ready for the adjustment: the metric's mean (the ratio R for ratio metrics), and the
    within-arm centred cross-products of y (L for ratio metrics) and z = (x, new)."""

    n: float
    mean: float
    syy: float
    szy: NDArray[np.float64]
    szz: NDArray[np.float64]
    z_sum: NDArray[np.float64]
    z_sq: NDArray[np.float64]


def _moments(arm: CupedSums | RatioCupedSums) -> _Moments:
    n = arm.n
    sxx = arm.sum_x2 - arm.sum_x * arm.sum_x / n
    # Σ x·new = 0 (new visitors have x = 0) and Σ new² = n_new.
    sxi = -arm.sum_x * arm.n_new / n
    sii = arm.n_new - arm.n_new * arm.n_new / n
    szz = np.array([[sxx, sxi], [sxi, sii]])
    z_sum = np.array([arm.sum_x, arm.n_new])
    # Uncentred Σz² per column (Σ new² = n_new): the scale a column's variation is judged against.
    z_sq = np.array([arm.sum_x2, arm.n_new])
    if isinstance(arm, CupedSums):
        szy = np.array([arm.sum_xy - arm.sum_x * arm.sum_y / n, arm.sum_y_new - arm.n_new * arm.sum_y / n])
        return _Moments(n, arm.sum_y / n, arm.sum_y2 - arm.sum_y * arm.sum_y / n, szy, szz, z_sum, z_sq)
    # Ratio: L = (m − R d)/d̄, so every centred cross-product of L is (that of m − R·that of d)/d̄.
    r = arm.sum_m / arm.sum_d
    d_bar = arm.sum_d / n
    smm = arm.sum_m2 - arm.sum_m * arm.sum_m / n
    sdd = arm.sum_d2 - arm.sum_d * arm.sum_d / n
    smd = arm.sum_md - arm.sum_m * arm.sum_d / n
    sxm = arm.sum_xm - arm.sum_x * arm.sum_m / n
    sxd = arm.sum_xd - arm.sum_x * arm.sum_d / n
    sim = arm.sum_m_new - arm.n_new * arm.sum_m / n
    sid = arm.sum_d_new - arm.n_new * arm.sum_d / n
    syy = (smm - 2.0 * r * smd + r * r * sdd) / d_bar / d_bar
    szy = np.array([(sxm - r * sxd) / d_bar, (sim - r * sid) / d_bar])
    return _Moments(n, r, syy, szy, szz, z_sum, z_sq)


def _summary_sums(n: float, mean: float, var: float) -> ArmSums:
    # Sums of a sample with this size, mean and variance: mean_and_var gives them back.
    return ArmSums(n=n, sum_x=n * mean, sum_x2=(n - 1.0) * var + n * mean * mean)


def _regression_adjust(control: _Moments, treatment: _Moments) -> tuple[NDArray[np.float64], list[ArmSums]]:
    """θ on (x, new) from the pooled within-arm cross-products, and each arm's adjusted summary sums."""
    szz, szy = control.szz + treatment.szz, control.szy + treatment.szy
    # Columns with (numerically) no variation cannot be regressed on: keep the others. Each column is
    # judged against its own scale (a covariate in IDR must not push out the 0/1 indicator).
    keep = np.diag(szz) > 1e-9 * (control.z_sq + treatment.z_sq)
    theta = np.zeros(2)
    if keep.any():
        sub = szz[np.ix_(keep, keep)]
        # det/Π diag is 1 − r² between the columns (1 for one column): near 0 they are collinear.
        collinear = not np.linalg.det(sub) > 1e-9 * float(np.prod(np.diag(sub)))
        if np.all(np.isfinite(sub)) and np.all(np.isfinite(szy)) and not collinear:
            theta[keep] = np.linalg.solve(sub, szy[keep])
    z_pooled = (control.z_sum + treatment.z_sum) / (control.n + treatment.n)
    adjusted_sums = []
    for arm in (control, treatment):
        mean = arm.mean - float(theta @ (arm.z_sum / arm.n - z_pooled))
        residual = arm.syy - 2.0 * float(theta @ arm.szy) + float(theta @ arm.szz @ theta)
        adjusted_sums.append(_summary_sums(arm.n, mean, max(residual, 0.0) / (arm.n - 1.0)))
    return theta, adjusted_sums


def cuped_uplift(
    control: CupedSums | RatioCupedSums,
    treatment: CupedSums | RatioCupedSums,
    alpha: float = 0.05,
    method: Method = "auto",
) -> CupedResult:
    """Regression-adjusted (CUPED) relative uplift, the same as OLS of y on arm + x + new-visitor indicator.

    θ is the pooled within-arm regression of y on z = (x, new): θ = Szz⁻¹ Szy with both arms' centred
    cross-products added, so the adjusted difference of means (ȳT − ȳC) − θ·(z̄T − z̄C) equals the OLS
    coefficient of the arm. Each arm's adjusted mean is ȳ − θ·(z̄ − z̄pooled) and its variance the
    residual variance var(y − θ·z); θ is treated as known (its error is O(1/n)). A covariate column
    without variation (no new visitors, or no pre-period at all) is left out of the regression.
    For a ratio metric (RatioCupedSums) y is the linearised ratio L = (m − R·d)/d̄ and ȳ is R: the
    adjusted ratio is R − θ·(z̄ − z̄pooled), the OLS coefficient of the arm for the values R_arm + L.
    """
    ratio = isinstance(control, RatioCupedSums)
    if ratio != isinstance(treatment, RatioCupedSums):
        raise TypeError("control and treatment must both be CupedSums or both RatioCupedSums")
    unadjusted = relative_uplift(control.metric(), treatment.metric(), ratio=ratio, alpha=alpha, method=method)
    nan_sums = ArmSums(NAN, NAN, NAN)
    if unadjusted.reason and "variance" not in unadjusted.reason:
        invalid = _invalid("cuped", NAN, NAN, unadjusted.reason)
        return CupedResult(invalid, unadjusted, invalid, (NAN, NAN), NAN, nan_sums, nan_sums, unadjusted.reason)
    # Extreme or inconsistent sums give NaN/inf below (and a reason from the comparison), not warnings.
    with np.errstate(all="ignore"):
        theta, adjusted_sums = _regression_adjust(_moments(control), _moments(treatment))
    adj_c, adj_t = adjusted_sums
    adjusted = relative_uplift(adj_c, adj_t, alpha=alpha, method=method)
    difference = absolute_difference(adj_c, adj_t, alpha=alpha)
    raw_difference = absolute_difference(control.metric(), treatment.metric(), ratio=ratio, alpha=alpha)
    reduction = NAN
    if raw_difference.std_error > 0.0:
        shrink = difference.std_error / raw_difference.std_error
        reduction = 1.0 - shrink * shrink  # not ** 2: float ** raises on overflow
    theta_pair = (float(theta[0]), float(theta[1]))
    return CupedResult(adjusted, unadjusted, difference, theta_pair, reduction, adj_c, adj_t, adjusted.reason)


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
