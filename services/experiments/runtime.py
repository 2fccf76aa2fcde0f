"""Experiments: configuration (experiments.yaml), sticky assignment, exposure recording and reports.

- Configuration is a YAML file loaded at start (`RECOMMEND_EXPERIMENTS_FILE`, default `experiments.yaml`);
  the admin API only reads it. An experiment covers slot kinds (`/v1/recommend`) and/or message channels
  (`/v1/next-best-message`); the first enabled, running experiment that covers a request serves it.
- Assignment is GrowthBook's hash v2 (services/experiments/assignment.py): deterministic and sticky per
  visitor, seed and bucket version; a global holdout never gets personalization and is not compared.
- Exposures are counted per visitor in the experiment store (services/experiments/store/base.py);
  outcomes are attributed by the profile service (services/profile/observers.py).
- Reports follow docs/statistics.md: per-visitor means, relative uplift with a fixed-horizon and an
  always-valid interval (both on the log-ratio scale at small samples), revenue capped at a pre-registered
  pooled quantile, Holm across goal metrics × arms, Benjamini–Hochberg across segments, an SRM check, and a
  verdict that waits for a minimum sample, decides on the peeking-safe interval and never calls "no
  difference" what the fixed-horizon interval calls significant.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from prometheus_client import Counter, Gauge, Histogram
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from services.common.clock import SYSTEM_CLOCK, Clock
from services.common.errors import StorageUnavailable
from services.experiments.assignment import DEFAULT_HOLDOUT_SEED, HOLDOUT_ARM, assign
from services.experiments.stats import (
    CAP_QUANTILE,
    ArmSums,
    CupedSums,
    RatioCupedSums,
    always_valid_interval,
    benjamini_hochberg,
    capped_cuped_sums,
    capped_sums,
    cuped_uplift,
    histogram_cap,
    holm,
    mean_and_var,
    relative_uplift,
    srm_check,
)
from services.experiments.store.base import (
    ALL,
    HISTOGRAM_METRICS,
    RATIO_METRICS,
    ExperimentStore,
    ExposureWrite,
    count_increments,
    open_experiment_store,
    parse_covariate_histogram,
    parse_histogram,
    touch_counters,
)
from services.recommend.repository import RecommendRepository
from services.recommend.service import ArmChooser
from services.recommend.settings import RecommendSettings

log = logging.getLogger(__name__)

Key = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
ArmName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
SlotLabel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
Metric = Literal["ctr", "conversion", "revenue", "add_to_cart", "open_rate"]
OTHER_SLOT: Final = "other"
RECOMMEND_METRICS: Final = ("ctr", "conversion", "revenue", "add_to_cart")
MESSAGE_METRICS: Final = ("open_rate", "ctr", "conversion", "revenue")
METRIC_LABELS: Final = {
    "ctr": "clicks per impression",
    "conversion": "share of visitors who bought",
    "revenue": "revenue per visitor (IDR)",
    "add_to_cart": "share of visitors who added to cart",
    "open_rate": "opens per message sent",
}
TIMELINE_DAYS: Final = 120

EXPERIMENT_REQUESTS = Counter(
    "selaras_experiment_requests", "Requests assigned to an experiment arm", ["experiment", "arm"]
)
EXPERIMENT_SERVED = Counter(
    "selaras_experiment_served",
    "Requests of an arm that were answered and recorded (requests - served = failures)",
    ["experiment", "arm"],
)
EXPOSURES_DROPPED = Counter(
    "selaras_experiment_exposures_dropped", "Exposures not recorded (store unavailable, arm conflict)", ["experiment"]
)
RANKING_SECONDS = Histogram(
    "selaras_experiment_ranking_seconds",
    "Time to rank a request, by experiment arm (guardrail: treatment must not be slower)",
    ["experiment", "arm"],
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
# Computed results: every replica computes the same values from the shared store, so take max/avg of
# these across replicas in PromQL, never sum ("mostrecent" does the same across uvicorn workers).
_RESULT_LABELS = ["experiment", "arm", "metric"]
UPLIFT = Gauge(
    "selaras_experiment_uplift",
    "Relative uplift of the arm over control",
    _RESULT_LABELS,
    multiprocess_mode="mostrecent",
)
UPLIFT_LOWER = Gauge(
    "selaras_experiment_uplift_ci_lower", "Fixed-horizon CI lower bound", _RESULT_LABELS, multiprocess_mode="mostrecent"
)
UPLIFT_UPPER = Gauge(
    "selaras_experiment_uplift_ci_upper", "Fixed-horizon CI upper bound", _RESULT_LABELS, multiprocess_mode="mostrecent"
)
ALWAYS_VALID_LOWER = Gauge(
    "selaras_experiment_uplift_always_valid_lower",
    "Always-valid (peeking-safe) CI lower bound",
    _RESULT_LABELS,
    multiprocess_mode="mostrecent",
)
ALWAYS_VALID_UPPER = Gauge(
    "selaras_experiment_uplift_always_valid_upper",
    "Always-valid (peeking-safe) CI upper bound",
    _RESULT_LABELS,
    multiprocess_mode="mostrecent",
)
P_VALUE = Gauge("selaras_experiment_p_value", "Welch p-value", _RESULT_LABELS, multiprocess_mode="mostrecent")
CHANCE_TO_WIN = Gauge(
    "selaras_experiment_chance_to_win", "Chance the arm beats control", _RESULT_LABELS, multiprocess_mode="mostrecent"
)
SRM_P_VALUE = Gauge(
    "selaras_experiment_srm_p_value", "Sample-ratio-mismatch p-value", ["experiment"], multiprocess_mode="mostrecent"
)
SRM_CHI2 = Gauge(
    "selaras_experiment_srm_chi2", "Sample-ratio-mismatch χ²", ["experiment"], multiprocess_mode="mostrecent"
)
SRM_FLAGGED = Gauge(
    "selaras_experiment_srm_flagged", "1 when the SRM check fails", ["experiment"], multiprocess_mode="mostrecent"
)
ARM_WEIGHT = Gauge(
    "selaras_experiment_arm_weight",
    "Configured traffic weight of the arm",
    ["experiment", "arm"],
    multiprocess_mode="max",
)
READY = Gauge(
    "selaras_experiment_ready_to_decide",
    "1 when the report's verdict is final",
    ["experiment"],
    multiprocess_mode="mostrecent",
)


class ExperimentConfigError(ValueError):
    """experiments.yaml is invalid: the service refuses to start rather than run a broken experiment."""


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


class ArmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ArmName
    weight: float = Field(ge=0, le=1)
    # False = the generic ranking by popularity in context (no visitor features), True = the model.
    personalized: bool
    description: str = ""


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Key
    description: str = ""
    enabled: bool = False
    slot_kinds: list[Literal["product", "banner", "cta"]] = Field(default_factory=list)
    channels: list[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]] = Field(default_factory=list)
    # Slot names reported on their own (report breakdown, Prometheus `slot` label); others count as "other".
    slots: list[SlotLabel] = Field(default_factory=list, max_length=20)
    arms: list[ArmConfig] = Field(min_length=2, max_length=8)
    control: ArmName = "control"
    coverage: float = Field(default=1.0, ge=0, le=1)
    seed: str | None = None
    # Bump to re-randomize everybody (e.g. after a broken launch); results start from zero.
    bucket_version: int = Field(default=1, ge=1, le=1000)
    start: AwareDatetime | None = None
    end: AwareDatetime | None = None
    attribution_window_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    primary_metric: Metric = "ctr"
    metrics: list[Metric] = Field(default_factory=list)
    min_visitors_per_arm: int = Field(default=100, ge=2)
    # Planned total sample N* for the always-valid interval (tightest around it).
    planned_visitors: int = Field(default=5000, ge=10)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("arm names must be unique")
        if HOLDOUT_ARM in names:
            raise ValueError(f"{HOLDOUT_ARM!r} is reserved for the global holdout")
        if self.control not in names:
            raise ValueError(f"control arm {self.control!r} is not one of the arms {names}")
        total = sum(arm.weight for arm in self.arms)
        if not 0.99 <= total <= 1.01:
            raise ValueError(f"arm weights must sum to 1, got {total:g}")
        if not self.slot_kinds and not self.channels:
            raise ValueError("an experiment must cover at least one slot kind or message channel")
        if self.start and self.end and self.end <= self.start:
            raise ValueError("end must be after start")
        if self.metrics and self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} must be one of metrics")
        return self

    @property
    def storage_id(self) -> str:
        return f"{self.key}@{self.bucket_version}"

    @property
    def arm_names(self) -> list[str]:
        return [arm.name for arm in self.arms]

    @property
    def goal_metrics(self) -> list[str]:
        if self.metrics:
            return list(self.metrics)
        chosen = list(RECOMMEND_METRICS if self.slot_kinds else ())
        for metric in MESSAGE_METRICS if self.channels else ():
            if metric not in chosen:
                chosen.append(metric)
        if self.primary_metric not in chosen:
            chosen.insert(0, self.primary_metric)
        return chosen

    @property
    def slot_labels(self) -> list[str]:
        labels = list(dict.fromkeys([*self.slots, *self.channels]))
        return [*labels, OTHER_SLOT] if self.slot_kinds else labels

    def slot_label(self, slot_name: str) -> str:
        return slot_name if slot_name in self.slots else OTHER_SLOT

    def status(self, now: float) -> str:
        if not self.enabled:
            return "disabled"
        if self.start and now < self.start.timestamp():
            return "scheduled"
        if self.end and now >= self.end.timestamp():
            return "ended"
        return "running"

    def registry_entry(self) -> dict[str, Any]:
        """What the profile service needs to attribute outcomes (published through the store)."""
        return {
            "key": self.key,
            "id": self.storage_id,
            "window_s": self.attribution_window_hours * 3600.0,
            "slots": list(self.slots),
            "channels": list(self.channels),
            "arms": self.arm_names,
        }


class ExperimentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Share of all visitors (by its own hash seed) that never gets personalization in any experiment.
    holdout: float = Field(default=0.0, ge=0, le=0.5)
    holdout_seed: str = DEFAULT_HOLDOUT_SEED
    # How often the recommend service recomputes the Prometheus result gauges.
    report_interval_s: float = Field(default=15.0, ge=1, le=3600)
    experiments: list[ExperimentConfig] = Field(default_factory=list, max_length=50)

    @model_validator(mode="after")
    def _unique_keys(self) -> ExperimentsFile:
        keys = [e.key for e in self.experiments]
        if len(set(keys)) != len(keys):
            raise ValueError("experiment keys must be unique")
        return self


def load_config(path: Path) -> ExperimentsFile:
    """Parse and validate experiments.yaml; errors name the experiment index and field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ExperimentConfigError(f"{path}: cannot read experiments: {exc}") from exc
    try:
        return ExperimentsFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(file)'}: {error['msg']}" for error in exc.errors()
        )
        raise ExperimentConfigError(f"{path}: invalid experiments: {problems}") from exc


# ------------------------------------------------------------------------------------------------
# Reports (pure: sums in, JSON-ready dict out)
# ------------------------------------------------------------------------------------------------


def _num(value: float) -> float | None:
    """JSON has no NaN/inf: undefined numbers are null."""
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def arm_sums(group: Mapping[str, Any] | None, metric: str) -> ArmSums:
    if not group:
        return ArmSums()
    stats = group.get(metric, {})
    return ArmSums(
        n=float(group.get("n", 0.0)),
        sum_x=float(stats.get("x", 0.0)),
        sum_x2=float(stats.get("x2", 0.0)),
        sum_y=float(stats.get("y", 0.0)),
        sum_y2=float(stats.get("y2", 0.0)),
        sum_xy=float(stats.get("xy", 0.0)),
    )


def _metric_summary(sums: ArmSums, metric: str) -> dict[str, Any]:
    mean, var = mean_and_var(sums, metric in RATIO_METRICS)
    summary: dict[str, Any] = {"mean": _num(mean), "std": _num(math.sqrt(var)) if var == var else None}
    summary["total"] = sums.sum_x
    if metric in RATIO_METRICS:
        summary["denominator"] = sums.sum_y
    return summary


def cuped_sums(group: Mapping[str, Any] | None, metric: str) -> CupedSums | RatioCupedSums | None:
    """The group's CUPED sums for a metric (see experiment_store.COVARIATE_STATS), None without any
    visitor with a pre-period. Visitors without one are the new-visitor indicator's, never dropped."""
    if not group:
        return None
    stats = group.get(metric, {})
    n = float(group.get("n", 0.0))
    with_pre = float(stats.get("cn", 0.0))
    if not with_pre > 0:
        return None

    def get(name: str) -> float:
        return float(stats.get(name, 0.0))

    if metric in RATIO_METRICS:
        return RatioCupedSums(
            n=n,
            sum_m=get("x"),
            sum_m2=get("x2"),
            sum_d=get("y"),
            sum_d2=get("y2"),
            sum_md=get("xy"),
            sum_x=get("c"),
            sum_x2=get("c2"),
            sum_xm=get("cx"),
            sum_xd=get("cy"),
            n_new=n - with_pre,
            sum_m_new=get("x") - get("cxp"),
            sum_d_new=get("y") - get("cyp"),
        )
    return CupedSums(
        n=n,
        sum_y=get("x"),
        sum_y2=get("x2"),
        sum_x=get("c"),
        sum_x2=get("c2"),
        sum_xy=get("cx"),
        n_new=n - with_pre,
        sum_y_new=get("x") - get("cxp"),
    )


def _cuped(
    control_group: Mapping[str, Any] | None,
    treatment_group: Mapping[str, Any] | None,
    metric: str,
    config: ExperimentConfig,
    cap: float = math.inf,
) -> dict[str, Any] | None:
    """The CUPED-adjusted comparison beside the unadjusted one, or None (no pre-period data).

    With a finite `cap` (heavy-tailed metrics) the metric values are capped like the unadjusted
    comparison, from the per-bucket covariate sums.
    """
    control, treatment = cuped_sums(control_group, metric), cuped_sums(treatment_group, metric)
    if control is None and treatment is None:
        return None
    # An arm without any visitor with a pre-period still has sums: all of its visitors are new.
    control = control or _all_new(control_group, metric)
    treatment = treatment or _all_new(treatment_group, metric)
    if math.isfinite(cap) and isinstance(control, CupedSums) and isinstance(treatment, CupedSums):
        control = capped_cuped_sums(
            control,
            _histogram(control_group, metric),
            parse_covariate_histogram((control_group or {}).get(metric, {})),
            cap,
        )
        treatment = capped_cuped_sums(
            treatment,
            _histogram(treatment_group, metric),
            parse_covariate_histogram((treatment_group or {}).get(metric, {})),
            cap,
        )
    result = cuped_uplift(control, treatment, alpha=config.alpha)
    valid = always_valid_interval(
        result.adjusted_control,
        result.adjusted_treatment,
        alpha=config.alpha,
        planned_n=float(config.planned_visitors),
    )
    adjusted = result.adjusted
    return {
        "uplift": _num(adjusted.uplift),
        "ci_lower": _num(adjusted.ci_lower),
        "ci_upper": _num(adjusted.ci_upper),
        "method": adjusted.method,
        "p_value": _num(adjusted.p_value),
        "significant": adjusted.significant,
        "always_valid": {
            "ci_lower": _num(valid.ci_lower),
            "ci_upper": _num(valid.ci_upper),
            "method": valid.method,
            "significant": valid.significant,
            "reason": valid.reason,
        },
        "variance_reduction_pct": _num(100.0 * result.variance_reduction),
        "theta": [_num(result.theta[0]), _num(result.theta[1])],
        "visitors_with_pre_period": {
            "control": float(((control_group or {}).get(metric) or {}).get("cn", 0.0)),
            "treatment": float(((treatment_group or {}).get(metric) or {}).get("cn", 0.0)),
        },
        "reason": result.reason,
    }


def _all_new(group: Mapping[str, Any] | None, metric: str) -> CupedSums | RatioCupedSums:
    sums = arm_sums(group, metric)
    if metric in RATIO_METRICS:
        return RatioCupedSums(
            n=sums.n,
            sum_m=sums.sum_x,
            sum_m2=sums.sum_x2,
            sum_d=sums.sum_y,
            sum_d2=sums.sum_y2,
            sum_md=sums.sum_xy,
            n_new=sums.n,
            sum_m_new=sums.sum_x,
            sum_d_new=sums.sum_y,
        )
    return CupedSums(n=sums.n, sum_y=sums.sum_x, sum_y2=sums.sum_x2, n_new=sums.n, sum_y_new=sums.sum_x)


def _histogram(group: Mapping[str, Any] | None, metric: str) -> dict[int, tuple[float, float, float]]:
    return parse_histogram(group.get(metric, {})) if group else {}


def _compare(
    control_group: Mapping[str, Any] | None,
    treatment_group: Mapping[str, Any] | None,
    metric: str,
    config: ExperimentConfig,
) -> dict[str, Any]:
    """One arm against control on one metric, from the two groups' stored sums.

    Heavy-tailed metrics (revenue) are compared on values capped at the pre-registered pooled quantile
    (stats.CAP_QUANTILE of the positive per-visitor values of both arms, from the stored histograms):
    every interval, p-value and the verdict use the capped sums; the uncapped uplift is shown beside them.
    """
    ratio = metric in RATIO_METRICS
    control, treatment = arm_sums(control_group, metric), arm_sums(treatment_group, metric)
    uncapped: dict[str, Any] | None = None
    cap = math.inf
    if metric in HISTOGRAM_METRICS:
        hist_c, hist_t = _histogram(control_group, metric), _histogram(treatment_group, metric)
        cap = histogram_cap([hist_c, hist_t])
        if math.isfinite(cap):
            raw = relative_uplift(control, treatment, ratio=ratio, alpha=config.alpha)
            uncapped = {
                "uplift": _num(raw.uplift),
                "ci_lower": _num(raw.ci_lower),
                "ci_upper": _num(raw.ci_upper),
                "p_value": _num(raw.p_value),
            }
            control, treatment = capped_sums(control, hist_c, cap), capped_sums(treatment, hist_t, cap)
    fixed = relative_uplift(control, treatment, ratio=ratio, alpha=config.alpha)
    valid = always_valid_interval(
        control, treatment, ratio=ratio, alpha=config.alpha, planned_n=float(config.planned_visitors)
    )
    result = {
        "metric": metric,
        "control_mean": _num(fixed.control_mean),
        "treatment_mean": _num(fixed.treatment_mean),
        "uplift": _num(fixed.uplift),
        "ci_lower": _num(fixed.ci_lower),
        "ci_upper": _num(fixed.ci_upper),
        "method": fixed.method,
        "p_value": _num(fixed.p_value),
        "chance_to_win": _num(fixed.chance_to_win),
        "significant": fixed.significant,
        "always_valid": {
            "ci_lower": _num(valid.ci_lower),
            "ci_upper": _num(valid.ci_upper),
            "method": valid.method,
            "significant": valid.significant,
            "reason": valid.reason,
        },
        "reason": fixed.reason,
    }
    if metric in HISTOGRAM_METRICS:
        # null when no visitor has a positive value yet (nothing to cap).
        result["capped_at"] = _num(cap)
        result["cap_quantile"] = CAP_QUANTILE
        result["uncapped"] = uncapped
    # CUPED on the same (capped, for revenue) values as the unadjusted comparison.
    result["cuped"] = _cuped(control_group, treatment_group, metric, config, cap)
    return result


def _breakdown(
    tree: Mapping[str, Mapping[str, Any]], config: ExperimentConfig, prefix: str, metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Per slot or persona: arm means and comparisons, with BH-adjusted p-values across the groups."""
    groups = sorted({g for arm in config.arm_names for g in tree.get(arm, {}) if g.startswith(prefix)})
    rows: list[dict[str, Any]] = []
    for group in groups:
        row: dict[str, Any] = {"group": group[len(prefix) :], "arms": {}, "results": []}
        for arm in config.arm_names:
            sums = tree.get(arm, {}).get(group)
            row["arms"][arm] = {
                "n": float(sums.get("n", 0.0)) if sums else 0.0,
                "metrics": {m: _metric_summary(arm_sums(sums, m), m) for m in metrics},
            }
        control = tree.get(config.control, {}).get(group)
        for arm in config.arm_names:
            if arm == config.control:
                continue
            for metric in metrics:
                result = _compare(control, tree.get(arm, {}).get(group), metric, config)
                row["results"].append({"arm": arm, **result})
        rows.append(row)
    # One BH family per (arm, metric) across the groups of this dimension.
    families: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        for result in row["results"]:
            families.setdefault((result["arm"], result["metric"]), []).append(result)
    for members in families.values():
        p = [m["p_value"] if m["p_value"] is not None else math.nan for m in members]
        adjusted, rejected = benjamini_hochberg(p, q=config.alpha)
        for member, adj, rej in zip(members, adjusted, rejected, strict=True):
            member["p_value_bh"] = _num(float(adj))
            member["significant_bh"] = bool(rej)
    return rows


def _timeline(days: Mapping[str, Mapping[str, Any]], config: ExperimentConfig) -> list[dict[str, Any]]:
    """Cumulative uplift of the primary metric after each day (prefix sums of the daily increments)."""
    metric = config.primary_metric
    running: dict[str, dict[str, Any]] = {arm: {"n": 0.0, metric: {}} for arm in config.arm_names}
    points: list[dict[str, Any]] = []
    for day in sorted(days):
        for arm, values in days[day].items():
            if arm not in running:
                continue
            running[arm]["n"] += float(values.get("n", 0.0))
            for stat, amount in values.get(metric, {}).items():
                running[arm][metric][stat] = running[arm][metric].get(stat, 0.0) + float(amount)
        control = running[config.control]
        point: dict[str, Any] = {"day": day, "n": {arm: running[arm]["n"] for arm in config.arm_names}, "arms": {}}
        for arm in config.arm_names:
            if arm == config.control:
                continue
            result = _compare(control, running[arm], metric, config)
            point["arms"][arm] = {
                "uplift": result["uplift"],
                "ci_lower": result["ci_lower"],
                "ci_upper": result["ci_upper"],
                "always_valid_lower": result["always_valid"]["ci_lower"],
                "always_valid_upper": result["always_valid"]["ci_upper"],
                "p_value": result["p_value"],
            }
        points.append(point)
    return points[-TIMELINE_DAYS:]


def _reason(code: str, text: str, **params: Any) -> dict[str, Any]:
    """A verdict reason: a code and parameters (the dashboard words it in its language) and English text."""
    return {"code": code, "text": text, "params": params}


def _decisive(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """The comparison the verdict reads: CUPED-adjusted when the metric has pre-period data (same
    estimand, narrower interval), the unadjusted one otherwise."""
    cuped = result.get("cuped")
    return cuped if cuped and not cuped["reason"] else result


def _verdict(
    config: ExperimentConfig, counts: Mapping[str, float], srm: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    results = [
        {**_decisive(r), "arm": r["arm"], "metric": r["metric"], "adjusted": _decisive(r) is not r} for r in results
    ]
    smallest = min(counts.values()) if counts else 0.0
    total = sum(counts.values())
    metric = config.primary_metric
    primary = [r for r in results if r["metric"] == metric]
    reasons: list[dict[str, Any]] = []
    decision = "keep_running"
    if srm["flagged"]:
        decision = "investigate_srm"
        reasons.append(
            _reason(
                "srm",
                f"sample ratio mismatch (p = {srm['p_value']:.2g}): assignment or logging is broken, "
                "so no uplift here can be trusted",
                p_value=srm["p_value"],
            )
        )
    elif smallest < config.min_visitors_per_arm:
        reasons.append(
            _reason(
                "min_sample",
                f"the smallest arm has {smallest:.0f} of the {config.min_visitors_per_arm} visitors required",
                smallest=smallest,
                required=config.min_visitors_per_arm,
            )
        )
    else:
        winners = [r for r in primary if r["always_valid"]["significant"] and (r["uplift"] or 0) > 0]
        losers = [r for r in primary if r["always_valid"]["significant"] and (r["uplift"] or 0) < 0]
        if winners:
            best = max(winners, key=lambda r: r["uplift"] or 0)
            harmed = [
                r["metric"]
                for r in results
                if r["arm"] == best["arm"]
                and r["metric"] != metric
                and r["always_valid"]["significant"]
                and (r["uplift"] or 0) < 0
            ]
            if harmed:
                decision = "investigate_guardrail"
                reasons.append(
                    _reason(
                        "guardrail",
                        f"{best['arm']} wins on {metric} but is worse on {', '.join(harmed)}",
                        arm=best["arm"],
                        metric=metric,
                        harmed=harmed,
                    )
                )
            else:
                decision = "ship_treatment"
                reasons.append(
                    _reason(
                        "winner",
                        f"{best['arm']} beats {config.control} on {metric} by {best['uplift']:+.1%}: the "
                        f"always-valid {1 - config.alpha:.0%} interval"
                        f"{' (CUPED-adjusted)' if best['adjusted'] else ''} excludes zero",
                        arm=best["arm"],
                        control=config.control,
                        metric=metric,
                        uplift=best["uplift"],
                        adjusted=best["adjusted"],
                    )
                )
        elif primary and len(losers) == len(primary):
            decision = "keep_control"
            reasons.append(
                _reason("loser", f"every arm is worse than {config.control} on {metric}", control=config.control)
            )
        elif fixed_only := [r for r in primary if r["significant"]]:
            # The verdict must not call "no difference" what the fixed-horizon test calls a clear one: the
            # peeking-safe interval is wider (or not shown yet), so this is "not confirmed yet", not "none".
            strongest = min(fixed_only, key=lambda r: r["p_value"] if r["p_value"] is not None else 1.0)
            p_text = f"{strongest['p_value']:.2g}" if strongest["p_value"] is not None else "n/a"
            reasons.append(
                _reason(
                    "fixed_horizon_only",
                    f"{strongest['arm']} differs from {config.control} on {metric} by {strongest['uplift']:+.1%} "
                    f"(p = {p_text}), but the always-valid interval does not exclude zero yet "
                    f"({strongest['always_valid']['reason'] or 'it is wider because it allows daily checks'}): "
                    "keep running to confirm",
                    arm=strongest["arm"],
                    metric=metric,
                    uplift=strongest["uplift"],
                    p_value=strongest["p_value"],
                )
            )
        elif total >= config.planned_visitors:
            decision = "no_detectable_difference"
            reasons.append(
                _reason(
                    "planned_reached",
                    f"the planned {config.planned_visitors} visitors were reached without a clear difference",
                    planned=config.planned_visitors,
                )
            )
        else:
            reasons.append(
                _reason(
                    "no_difference_yet",
                    f"no clear difference yet; {total:.0f} of the planned {config.planned_visitors} visitors "
                    "(decisions use the always-valid interval, so checking daily is safe)",
                    total=total,
                    planned=config.planned_visitors,
                )
            )
    final = {"ship_treatment", "keep_control", "no_detectable_difference"}
    return {
        "ready": decision in final,
        "decision": decision,
        "reasons": reasons,
        "min_visitors_per_arm": config.min_visitors_per_arm,
        "planned_visitors": config.planned_visitors,
    }


def build_report(
    config: ExperimentConfig,
    tree: Mapping[str, Mapping[str, Any]],
    days: Mapping[str, Mapping[str, Any]],
    now: float,
) -> dict[str, Any]:
    """The experiment report from its stored sums (see the module docstring for the statistics)."""
    metrics = config.goal_metrics
    counts = {arm: float(tree.get(arm, {}).get(ALL, {}).get("n", 0.0)) for arm in config.arm_names}
    weights = [arm.weight for arm in config.arms]
    chi2, srm_p, flagged = srm_check([counts[a] for a in config.arm_names], weights)
    total_weight = sum(weights) or 1.0
    total_n = sum(counts.values())
    srm = {
        "chi2": _num(chi2),
        "p_value": _num(srm_p),
        "flagged": flagged,
        "observed": counts,
        "expected": {arm.name: total_n * arm.weight / total_weight for arm in config.arms},
    }
    arms = []
    for arm in config.arms:
        group = tree.get(arm.name, {}).get(ALL)
        arms.append(
            {
                "name": arm.name,
                "weight": arm.weight,
                "personalized": arm.personalized,
                "n": counts[arm.name],
                "share": counts[arm.name] / total_n if total_n else None,
                "metrics": {m: _metric_summary(arm_sums(group, m), m) for m in metrics},
            }
        )
    control = tree.get(config.control, {}).get(ALL)
    results: list[dict[str, Any]] = []
    for name in config.arm_names:
        if name == config.control:
            continue
        for metric in metrics:
            results.append({"arm": name, **_compare(control, tree.get(name, {}).get(ALL), metric, config)})
    adjusted, rejected = holm([r["p_value"] if r["p_value"] is not None else math.nan for r in results], config.alpha)
    for result, adj, rej in zip(results, adjusted, rejected, strict=True):
        result["p_value_holm"] = _num(float(adj))
        result["significant_holm"] = bool(rej)
    holdout_group = tree.get(HOLDOUT_ARM, {}).get(ALL)
    holdout = (
        {
            "n": float(holdout_group.get("n", 0.0)),
            "metrics": {m: _metric_summary(arm_sums(holdout_group, m), m) for m in metrics},
        }
        if holdout_group
        else None
    )
    return {
        "key": config.key,
        "description": config.description,
        "status": config.status(now),
        "start": config.start.isoformat() if config.start else None,
        "end": config.end.isoformat() if config.end else None,
        "control": config.control,
        "primary_metric": config.primary_metric,
        "metrics": [{"name": m, "label": METRIC_LABELS[m], "ratio": m in RATIO_METRICS} for m in metrics],
        "alpha": config.alpha,
        "generated_at": datetime.fromtimestamp(now, tz=UTC).isoformat(),
        "arms": arms,
        "holdout": holdout,
        "results": results,
        "srm": srm,
        "breakdowns": {
            "slot": _breakdown(tree, config, "slot:", metrics),
            "persona": _breakdown(tree, config, "seg:", metrics),
        },
        "timeline": _timeline(days, config),
        "verdict": _verdict(config, counts, srm, results),
    }


# ------------------------------------------------------------------------------------------------
# Runtime
# ------------------------------------------------------------------------------------------------


class ExperimentRuntime(ArmChooser):
    """Assignment, exposure recording and reports for the configured experiments."""

    def __init__(
        self,
        config: ExperimentsFile,
        store: ExperimentStore,
        record_ttl_s: int = 8 * 86400,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.config = config
        self.clock = clock
        self.store = store
        self.record_ttl_s = record_ttl_s
        self.by_key = {e.key: e for e in config.experiments}
        self.enabled = [e for e in config.experiments if e.enabled]
        self._registry_published = False
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        for experiment in self.enabled:
            touch_counters(experiment.key, experiment.arm_names, experiment.goal_metrics, experiment.slot_labels)
            for arm in experiment.arms:
                ARM_WEIGHT.labels(experiment.key, arm.name).set(arm.weight)
        self.publish_registry()

    def publish_registry(self) -> bool:
        try:
            self.store.publish_registry({e.key: e.registry_entry() for e in self.enabled})
            self._registry_published = True
        except StorageUnavailable:
            log.warning("experiment registry not published (store unavailable); retrying in the background")
        return self._registry_published

    # -- assignment ---------------------------------------------------------------------------------
    def _assign(self, experiment: ExperimentConfig, visitor_id: str) -> tuple[str, str, bool] | None:
        assignment = assign(
            experiment.key,
            visitor_id,
            experiment.arm_names,
            [arm.weight for arm in experiment.arms],
            experiment.coverage,
            seed=experiment.seed,
            holdout=self.config.holdout,
            holdout_seed=self.config.holdout_seed,
            bucket_version=experiment.bucket_version,
        )
        if assignment is None:
            return None
        if assignment.arm == HOLDOUT_ARM:
            chosen = (experiment.key, HOLDOUT_ARM, False)
        else:
            arm = next(a for a in experiment.arms if a.name == assignment.arm)
            chosen = (experiment.key, arm.name, arm.personalized)
        EXPERIMENT_REQUESTS.labels(experiment.key, chosen[1]).inc()
        return chosen

    def assign_recommend(self, visitor_id: str, slot_kinds: Sequence[str], now: float) -> tuple[str, str, bool] | None:
        kinds = set(slot_kinds)
        for experiment in self.enabled:
            if kinds.intersection(experiment.slot_kinds) and experiment.status(now) == "running":
                chosen = self._assign(experiment, visitor_id)
                if chosen is not None:
                    return chosen
        return None

    def assign_message(self, visitor_id: str, channel: str, now: float | None = None) -> tuple[str, str, bool] | None:
        """For `/v1/next-best-message`: (experiment key, arm, personalized) or None (no experiment)."""
        moment = self.clock.now() if now is None else now
        for experiment in self.enabled:
            if channel in experiment.channels and experiment.status(moment) == "running":
                chosen = self._assign(experiment, visitor_id)
                if chosen is not None:
                    return chosen
        return None

    # -- exposures ----------------------------------------------------------------------------------
    def record_exposure(
        self,
        visitor_id: str,
        key: str,
        arm: str,
        shown: Mapping[str, tuple[str, Sequence[str]]],
        persona: str | None,
        recommendation_id: str,
        now: float,
        took_s: float,
        covariates: Mapping[str, float] | None = None,
    ) -> None:
        experiment = self.by_key.get(key)
        if experiment is None:
            return
        denominators: dict[str, dict[str, float]] = {ALL: {"ctr": 0.0}}
        slots: dict[str, list[str]] = {}
        for slot_name, (_kind, items) in shown.items():
            label = experiment.slot_label(slot_name)
            group = denominators.setdefault(f"slot:{label}", {"ctr": 0.0})
            group["ctr"] += len(items)
            denominators[ALL]["ctr"] += len(items)
            slots.setdefault(label, []).extend(items)
        record = {"visitor_id": visitor_id, "ts": now, "arm": arm, "kind": "recommend", "slots": slots}
        self._write(experiment, visitor_id, arm, persona, now, denominators, recommendation_id, record, covariates)
        RANKING_SECONDS.labels(key, arm).observe(took_s)

    def record_message_exposure(
        self,
        visitor_id: str,
        key: str,
        arm: str,
        channel: str,
        recommendation_id: str,
        now: float | None = None,
        persona: str | None = None,
        item_id: str | None = None,
        covariates: Mapping[str, float] | None = None,
    ) -> None:
        """One message sent under an experiment arm (its opens and clicks are attributed by the id)."""
        experiment = self.by_key.get(key)
        if experiment is None:
            return
        moment = self.clock.now() if now is None else now
        sent = {"ctr": 1.0, "open_rate": 1.0}
        denominators = {ALL: dict(sent), f"slot:{channel}": dict(sent)}
        record = {
            "visitor_id": visitor_id,
            "ts": moment,
            "arm": arm,
            "kind": "message",
            "slots": {channel: [item_id] if item_id else []},
        }
        self._write(experiment, visitor_id, arm, persona, moment, denominators, recommendation_id, record, covariates)

    def _write(
        self,
        experiment: ExperimentConfig,
        visitor_id: str,
        arm: str,
        persona: str | None,
        now: float,
        denominators: Mapping[str, Mapping[str, float]],
        recommendation_id: str,
        record: Mapping[str, Any],
        covariates: Mapping[str, float] | None = None,
    ) -> None:
        # covariates: metric -> the visitor's pre-exposure value for CUPED (used at the first exposure);
        # the callers do not supply them yet, so every visitor counts as new and reports have no CUPED block.
        write = ExposureWrite(
            experiment.storage_id,
            visitor_id,
            arm,
            persona or "unknown",
            now,
            denominators,
            recommendation_id,
            record,
            record_ttl_s=int(experiment.attribution_window_hours * 3600) + self.record_ttl_s,
            covariates=covariates,
        )
        try:
            applied = self.store.record_exposure(write)
        except StorageUnavailable:
            # Never fail a recommendation because the experiment store hiccuped; the drop is counted.
            EXPOSURES_DROPPED.labels(experiment.key).inc()
            return
        if applied.status != "ok":
            EXPOSURES_DROPPED.labels(experiment.key).inc()
            log.warning("exposure not recorded: %s", applied.status)
            return
        count_increments(experiment.key, arm, applied.increments)
        EXPERIMENT_SERVED.labels(experiment.key, arm).inc()

    # -- reports --------------------------------------------------------------------------------------
    def describe(self, experiment: ExperimentConfig, now: float | None = None) -> dict[str, Any]:
        moment = self.clock.now() if now is None else now
        data = experiment.model_dump(mode="json")
        data["status"] = experiment.status(moment)
        data["goal_metrics"] = experiment.goal_metrics
        data["holdout"] = self.config.holdout
        return data

    def report(self, key: str, now: float | None = None) -> dict[str, Any]:
        experiment = self.by_key[key]
        moment = self.clock.now() if now is None else now
        report = build_report(
            experiment, self.store.sums(experiment.storage_id), self.store.days(experiment.storage_id), moment
        )
        if experiment.enabled:
            self._set_gauges(experiment, report)
        return report

    def _set_gauges(self, experiment: ExperimentConfig, report: Mapping[str, Any]) -> None:
        key = experiment.key

        def value(v: float | None) -> float:
            return math.nan if v is None else float(v)

        for result in report["results"]:
            labels = (key, result["arm"], result["metric"])
            UPLIFT.labels(*labels).set(value(result["uplift"]))
            UPLIFT_LOWER.labels(*labels).set(value(result["ci_lower"]))
            UPLIFT_UPPER.labels(*labels).set(value(result["ci_upper"]))
            ALWAYS_VALID_LOWER.labels(*labels).set(value(result["always_valid"]["ci_lower"]))
            ALWAYS_VALID_UPPER.labels(*labels).set(value(result["always_valid"]["ci_upper"]))
            P_VALUE.labels(*labels).set(value(result["p_value"]))
            CHANCE_TO_WIN.labels(*labels).set(value(result["chance_to_win"]))
        srm = report["srm"]
        SRM_P_VALUE.labels(key).set(value(srm["p_value"]))
        SRM_CHI2.labels(key).set(value(srm["chi2"]))
        SRM_FLAGGED.labels(key).set(1.0 if srm["flagged"] else 0.0)
        READY.labels(key).set(1.0 if report["verdict"]["ready"] else 0.0)

    def refresh_gauges(self) -> None:
        if not self._registry_published:
            self.publish_registry()
        for experiment in self.enabled:
            try:
                self.report(experiment.key)
            except StorageUnavailable:
                log.warning("experiment gauges not refreshed: the store is unavailable")
                return

    def start_refresher(self) -> None:
        """Recompute the result gauges periodically (a daemon thread that ends with the runtime)."""
        if self._refresher is not None or not self.enabled:
            return
        self._refresher = threading.Thread(
            target=_refresh_loop,
            args=(weakref.ref(self), self._stop, self.config.report_interval_s),
            name="experiment-gauges",
            daemon=True,
        )
        self._refresher.start()

    def close(self) -> None:
        self._stop.set()
        self.store.close()


def _refresh_loop(runtime_ref: weakref.ref[ExperimentRuntime], stop: threading.Event, interval: float) -> None:
    # A weak reference: an app that is thrown away (tests) does not keep its runtime alive through this.
    while not stop.wait(interval):
        runtime = runtime_ref()
        if runtime is None:
            return
        try:
            runtime.refresh_gauges()
        except Exception as exc:  # keep refreshing after a bad cycle
            log.warning("experiment gauge refresh failed: %s", type(exc).__name__)
        del runtime


def load_experiments(
    settings: RecommendSettings, repository: RecommendRepository, clock: Clock = SYSTEM_CLOCK
) -> ArmChooser | None:
    """The experiment runtime for the service, or None when no experiments file exists or it is empty."""
    path = settings.experiments_file
    if not path.exists():
        log.info("no experiments file at %s: experiments are off", path)
        return None
    config = load_config(path)
    if not config.experiments:
        return None
    runtime = ExperimentRuntime(config, open_experiment_store(settings), settings.recommendation_ttl_s, clock)
    runtime.start_refresher()
    log.info("experiments loaded: %d configured, %d enabled", len(config.experiments), len(runtime.enabled))
    return runtime
