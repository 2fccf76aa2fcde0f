"""Fixed-horizon comparisons of two arms from per-arm sufficient statistics (pure numpy/scipy, no I/O).

Unit of randomization and analysis is the visitor: every sum below is over visitors, with x the
visitor's metric value (or numerator, e.g. clicks) and y the denominator of a ratio metric
(e.g. impressions). Degenerate inputs never raise: results carry NaN fields and a `reason`.
The methods, their switches and the simulations that calibrate them are described in docs/statistics.md;
the peeking-safe interval is in sequential.py, capping in capping.py, CUPED in cuped.py, the sample-ratio
check in srm.py and the multiple-testing corrections in multiplicity.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

NAN = math.nan
# Below these the delta-method interval for a relative uplift under-covers (91.9% nominal-95% at
# p=2%, 500/arm), so "auto" switches to the log-ratio interval.
SMALL_SAMPLE_PER_ARM = 5000
LOW_BASE_RATE = 0.02

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


def invalid_result(method: str, control_mean: float, treatment_mean: float, reason: str) -> UpliftResult:
    return UpliftResult(NAN, NAN, NAN, NAN, NAN, NAN, method, NAN, control_mean, treatment_mean, reason)


def expm1_capped(v: float) -> float:
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


def floor_at_minus_one(lower: float, mc: float, mt: float) -> float:
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
        return invalid_result(method, mc, mt, problem)
    if mc == 0.0:
        return invalid_result(method, mc, mt, "zero control mean: relative uplift undefined")
    if method not in ("auto", "delta", "log_ratio"):
        return invalid_result(method, mc, mt, f"unknown method {method!r}")
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
        return invalid_result(method, mc, mt, "log-ratio interval needs positive means in both arms")

    if chosen == "delta":
        se, df, q, p, ctw = _t_test(uplift, var_t_delta, nt, var_c_delta, nc, alpha)
        lower, upper = floor_at_minus_one(uplift - q * se, mc, mt), uplift + q * se
    else:
        log_r = math.log(mt) - math.log(mc)
        se, df, q, p, ctw = _t_test(log_r, vt / nt / mt / mt, nt, vc / nc / mc / mc, nc, alpha)
        lower, upper = expm1_capped(log_r - q * se), expm1_capped(log_r + q * se)
    reason = "" if se > 0.0 and math.isfinite(p) else "zero or undefined variance"
    return UpliftResult(uplift, lower, upper, p, delta_se, df, chosen, ctw, mc, mt, reason)


def absolute_difference(control: ArmSums, treatment: ArmSums, ratio: bool = False, alpha: float = 0.05) -> UpliftResult:
    """Welch t-test on mT - mC (same as scipy.stats.ttest_ind(equal_var=False) for means)."""
    mc, vc = mean_and_var(control, ratio)
    mt, vt = mean_and_var(treatment, ratio)
    problem = _input_problem(control, treatment, alpha, ratio)
    if problem:
        return invalid_result("welch_absolute", mc, mt, problem)
    diff = mt - mc
    se, df, q, p, ctw = _t_test(diff, vt / treatment.n, treatment.n, vc / control.n, control.n, alpha)
    reason = "" if se > 0.0 and math.isfinite(p) else "zero or undefined variance"
    return UpliftResult(diff, diff - q * se, diff + q * se, p, se, df, "welch_absolute", ctw, mc, mt, reason)
