"""Experiment configuration: experiments.yaml, its arms, and what each experiment covers and measures.

The configuration lives in the shared store (config_store.py), changed through the admin API; the YAML file
(`RECOMMEND_EXPERIMENTS_FILE`, default `experiments.yaml`) seeds it when the store holds none. An experiment
covers slot kinds (`/v1/recommend`) and/or message channels (`/v1/next-best-message`); the first
enabled, running experiment that covers a request, admits the visitor (targeting, namespace) and assigns an
arm serves it (runtime.py).

Namespaces (GrowthBook's): experiments that declare the same `namespace` split its hash space by
`namespace_range`; a visitor falls into one range of each namespace, so into at most one of its experiments.
Two enabled experiments of one namespace whose ranges and schedules overlap are refused (naming the field).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from services.experiments.assignment import DEFAULT_HOLDOUT_SEED, HOLDOUT_ARM
from services.experiments.targeting import ExperimentTargeting

Key = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
ArmName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
SlotLabel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
Metric = Literal["ctr", "conversion", "revenue", "add_to_cart", "open_rate"]
OTHER_SLOT: Final = "other"
RECOMMEND_METRICS: Final = ("ctr", "conversion", "revenue", "add_to_cart")
MESSAGE_METRICS: Final = ("open_rate", "ctr", "conversion", "revenue")


class ExperimentConfigError(ValueError):
    """experiments.yaml is invalid: the service refuses to start rather than run a broken experiment."""


class ConfigFieldError(ValueError):
    """A configuration error found across experiments, about one field of one of them: `field` is its path
    (`experiments.<i>.<name>`), which the admin API's 422 names (config_store.validate_config)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ArmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    name: ArmName
    weight: float = Field(ge=0, le=1)
    # False = the generic ranking by popularity in context (no visitor features), True = the model.
    personalized: bool
    # A ranker version from the model registry (`GET /v1/admin/models/ranker`): this arm is ranked by it,
    # side by side with the other arms in the same process. None = the version that serves.
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    # A ranking configuration this arm serves instead of the service's settings (None: the settings): the
    # candidate generators it may use and the most items per category in a product slot. The recommend service
    # knows the generator names and refuses unknown ones (422 through the admin API).
    candidate_sources: (
        Annotated[
            list[Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")]], Field(min_length=1, max_length=20)
        ]
        | None
    ) = None
    max_per_category: int | None = Field(default=None, ge=1, le=100)
    description: str = ""

    @model_validator(mode="after")
    def _model_needs_personalization(self) -> ArmConfig:
        if self.model is not None and not self.personalized:
            raise ValueError(f"arm {self.name!r} names a model but is not personalized")
        return self


class ArmChoice(NamedTuple):
    """The arm a visitor is served: (experiment key, arm, personalized[, ranker version, ranking configuration]).
    A tuple, so callers that read `choice[0..2]` keep working; `model` is None when the arm serves the serving
    version, `candidate_sources` and `max_per_category` None when it ranks with the service's settings."""

    key: str
    arm: str
    personalized: bool
    model: str | None = None
    candidate_sources: tuple[str, ...] | None = None
    max_per_category: int | None = None


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
    # The arm promoted as the winner (POST /v1/experiments/{key}/promote), which also ended the experiment.
    winner: ArmName | None = None
    # Who may enter (targeting.py): checked before assignment; an exposed visitor keeps the arm (frozen).
    targeting: ExperimentTargeting | None = None
    # Mutual exclusion: the experiment takes visitors whose namespace hash falls in [start, end) only.
    namespace: Key | None = None
    namespace_range: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (0.0, 1.0)

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
        if self.winner is not None and self.winner not in names:
            raise ValueError(f"winner {self.winner!r} is not one of the arms {names}")
        if self.metrics and self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} must be one of metrics")
        if self.namespace_range[0] >= self.namespace_range[1]:
            raise ValueError(f"namespace_range must be [start, end) with start < end, got {list(self.namespace_range)}")
        return self

    def overlaps_in_time(self, other: ExperimentConfig) -> bool:
        """Whether the two schedules share a moment (an open start or end reaches forever)."""
        starts_before_other_ends = self.start is None or other.end is None or self.start < other.end
        ends_after_other_starts = self.end is None or other.start is None or self.end > other.start
        return starts_before_other_ends and ends_after_other_starts

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
        namespace_conflict(self.experiments)
        return self


def namespace_conflict(experiments: list[ExperimentConfig]) -> None:
    """Refuse two enabled experiments of one namespace whose ranges and schedules overlap: a visitor could fall
    into both. Any overlap is refused, whatever surfaces they cover: a namespace promises at most one of its
    experiments per visitor (put experiments that may share visitors in different namespaces, or in none)."""
    for i, experiment in enumerate(experiments):
        if experiment.namespace is None or not experiment.enabled:
            continue
        start, end = experiment.namespace_range
        for other in experiments[:i]:
            if other.namespace != experiment.namespace or not other.enabled:
                continue
            other_start, other_end = other.namespace_range
            if start < other_end and other_start < end and experiment.overlaps_in_time(other):
                raise ConfigFieldError(
                    f"experiments.{i}.namespace_range",
                    f"[{start:g}, {end:g}) overlaps [{other_start:g}, {other_end:g}) of experiment {other.key!r} in "
                    f"namespace {experiment.namespace!r}, and both are enabled at the same time: a visitor could "
                    "fall into both. Give them disjoint ranges, disable one, or end one before the other starts",
                )


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
