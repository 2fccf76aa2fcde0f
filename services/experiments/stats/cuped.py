"""CUPED: regression adjustment on a pre-exposure covariate, from additive per-arm sums."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.experiments.stats.intervals import (
    NAN,
    ArmSums,
    Method,
    UpliftResult,
    absolute_difference,
    invalid_result,
    relative_uplift,
)


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
        invalid = invalid_result("cuped", NAN, NAN, unadjusted.reason)
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
