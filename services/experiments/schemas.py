"""The experiment report's shape (`GET /v1/experiments/{key}/report`), for the OpenAPI document and generated
clients. report.build_report produces it as plain data (served as is, for speed);
tests/experiments/test_report_schema.py validates real reports against these models, which forbid unknown
fields, so the two cannot drift apart. Undefined numbers (no data yet, zero variance) are null.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Decision = Literal[
    "ship_treatment", "keep_control", "no_detectable_difference", "keep_running", "investigate_srm",
    "investigate_guardrail",
]  # fmt: skip


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MetricInfo(_Shape):
    name: str
    label: str
    ratio: bool = Field(description="A ratio of sums (clicks per impression): `denominator` is reported")


class MetricSummary(_Shape):
    mean: float | None = Field(description="Per-visitor mean, or ΣM/ΣD for a ratio metric")
    std: float | None
    total: float = Field(description="Σ of the metric over visitors (the numerator of a ratio metric)")
    denominator: float | None = Field(default=None, description="Ratio metrics: Σ of the denominator")


class ArmReport(_Shape):
    name: str
    weight: float
    personalized: bool
    model: str | None = Field(description="The ranker version the arm names (None: the serving version)")
    n: float = Field(description="Visitors exposed")
    share: float | None
    metrics: dict[str, MetricSummary]


class GroupSummary(_Shape):
    n: float
    metrics: dict[str, MetricSummary]


class AlwaysValid(_Shape):
    ci_lower: float | None
    ci_upper: float | None
    method: str
    significant: bool
    reason: str = Field(description="Why the interval is not shown yet (empty when it is)")


class Uncapped(_Shape):
    uplift: float | None
    ci_lower: float | None
    ci_upper: float | None
    p_value: float | None


class PrePeriodVisitors(_Shape):
    control: float
    treatment: float


class CupedComparison(_Shape):
    """The CUPED-adjusted comparison (regression on the visitors' pre-exposure covariate, docs/statistics.md)."""

    uplift: float | None
    ci_lower: float | None
    ci_upper: float | None
    method: str
    p_value: float | None
    significant: bool
    always_valid: AlwaysValid
    variance_reduction_pct: float | None = Field(description="1 − Var(adjusted)/Var(unadjusted), in %")
    theta: list[float | None] = Field(description="θ of the covariate and of the new-visitor indicator")
    visitors_with_pre_period: PrePeriodVisitors
    reason: str


class Comparison(_Shape):
    """One arm against control on one metric: relative uplift with its fixed-horizon and always-valid
    intervals; revenue also reports its cap and the uncapped uplift; `cuped` the adjusted comparison (null
    when no visitor has a pre-period)."""

    arm: str
    metric: str
    control_mean: float | None
    treatment_mean: float | None
    uplift: float | None
    ci_lower: float | None
    ci_upper: float | None
    method: str
    p_value: float | None
    chance_to_win: float | None
    significant: bool
    always_valid: AlwaysValid
    reason: str
    capped_at: float | None = None
    cap_quantile: float | None = None
    uncapped: Uncapped | None = None
    cuped: CupedComparison | None


class Result(Comparison):
    p_value_holm: float | None = Field(description="Holm-adjusted across goal metrics × arms")
    significant_holm: bool


class SegmentResult(Comparison):
    p_value_bh: float | None = Field(description="Benjamini–Hochberg-adjusted across the groups")
    significant_bh: bool


class BreakdownRow(_Shape):
    group: str
    arms: dict[str, GroupSummary]
    results: list[SegmentResult]


class Breakdowns(_Shape):
    slot: list[BreakdownRow]
    persona: list[BreakdownRow] = Field(description="Personas frozen at the visitor's first exposure")


class TimelineArm(_Shape):
    uplift: float | None
    ci_lower: float | None
    ci_upper: float | None
    always_valid_lower: float | None
    always_valid_upper: float | None
    p_value: float | None


class TimelinePoint(_Shape):
    day: str
    n: dict[str, float]
    arms: dict[str, TimelineArm]


class Srm(_Shape):
    chi2: float | None
    p_value: float | None
    flagged: bool
    observed: dict[str, float]
    expected: dict[str, float]


class Reason(_Shape):
    code: str
    text: str
    params: dict[str, Any]


class Verdict(_Shape):
    ready: bool
    decision: Decision
    reasons: list[Reason]
    min_visitors_per_arm: int
    planned_visitors: int


class ExperimentReport(_Shape):
    """Per-arm means, uplift with fixed and always-valid intervals (CUPED-adjusted beside them), p-values, SRM,
    breakdowns by slot and persona, the cumulative timeline and a verdict."""

    key: str
    description: str
    status: Literal["disabled", "scheduled", "running", "ended"]
    start: str | None
    end: str | None
    control: str
    primary_metric: str
    metrics: list[MetricInfo]
    alpha: float
    generated_at: str
    arms: list[ArmReport]
    holdout: GroupSummary | None
    results: list[Result]
    srm: Srm
    breakdowns: Breakdowns
    timeline: list[TimelinePoint]
    verdict: Verdict
