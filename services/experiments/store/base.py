"""The experiment store's interface and records, shared by the recommend service (exposures) and the profile
service (outcomes), on both storage backends (redis_store.py, sqlite_store.py).

Each visitor's running x and y live next to the per-arm sums (sums.py). An update changes a visitor's value
from x to x+δ and adds exactly the increments of docs/statistics.md to the sums, in one atomic step: a Lua
script on Redis, one `BEGIN IMMEDIATE` transaction on SQLite. The applied increments are returned so the
caller can add the same amounts to its Prometheus counters (each process exports only what it applied, so
summing replicas equals the stored totals).
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from services.experiments.store.sums import BINARY_METRICS, HISTOGRAM_METRICS, METRICS, SumsTree, parse_days, parse_sums

VISITOR_TTL_S: Final = 400 * 86400  # longer than any experiment: an expired visitor would be counted again


@dataclass(frozen=True)
class Applied:
    """What one update did. `status` is "ok", "duplicate", "not_exposed", "arm_mismatch", "arm_conflict"
    or "outside_window"; `increments` maps "group|n" or "group|metric|stat" to the amount added."""

    status: str
    arm: str = ""
    increments: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ExposureWrite:
    experiment_id: str
    visitor_id: str
    arm: str
    segment: str
    ts: float
    # group ("all" or "slot:<name>") -> metric -> denominator increment (e.g. items shown).
    denominators: Mapping[str, Mapping[str, float]]
    recommendation_id: str | None = None
    record: Mapping[str, Any] | None = None
    record_ttl_s: int = 8 * 86400
    # CUPED: metric -> the visitor's pre-exposure value (point-in-time, before the first exposure). Used
    # at the first exposure only (frozen, like the segment); a metric left out = no pre-period (new visitor).
    covariates: Mapping[str, float] | None = None


@dataclass(frozen=True)
class OutcomeWrite:
    experiment_id: str
    visitor_id: str
    event_id: str
    ts: float
    # metric -> amount (ignored for binary metrics: they become 1 once).
    values: Mapping[str, float]
    slot_group: str | None = None
    expected_arm: str | None = None
    # Either the outcome must fall in [lower, upper] (attributed by recommendation id) ...
    lower: float | None = None
    upper: float | None = None
    # ... or within window_s after one of the visitor's exposures (first <= ts <= last + window).
    window_s: float | None = None


@dataclass(frozen=True)
class ErasedVisitor:
    running_values: int  # per-experiment visitor state (arm, first/last exposure, values so far)
    exposure_records: int  # recommendation id -> exposure record (visitor id, arm, items shown)


@dataclass(frozen=True)
class Reindexed:
    experiments: int  # experiment ids known to erasure and export
    exposure_records: int  # records added to the index of the visitor they name


@dataclass(frozen=True)
class VisitorHead:
    arm: str
    first: float
    last: float


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def clean_label(text: str) -> str:
    """Group names go into `|`-separated field names."""
    return text.replace("|", "/")[:64] or "unknown"


def denominator_args(denominators: Mapping[str, Mapping[str, float]]) -> list[tuple[str, str, float]]:
    entries: list[tuple[str, str, float]] = []
    for group in sorted(denominators):
        for metric in sorted(denominators[group]):
            amount = float(denominators[group][metric])
            if amount < 0 or not math.isfinite(amount):
                raise ValueError(f"denominator increments must be finite and >= 0, got {amount}")
            entries.append((group, metric, amount))
    return entries


def covariate_args(covariates: Mapping[str, float] | None) -> list[tuple[str, float]]:
    entries: list[tuple[str, float]] = []
    for metric in sorted(covariates or {}):
        if metric not in METRICS:
            raise ValueError(f"unknown metric for a covariate: {metric!r}")
        value = float((covariates or {})[metric])
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"covariates must be finite and >= 0, got {value}")
        entries.append((metric, value))
    return entries


def value_args(values: Mapping[str, float]) -> list[tuple[str, str, float]]:
    entries: list[tuple[str, str, float]] = []
    for metric in sorted(values):
        amount = float(values[metric])
        if amount < 0 or not math.isfinite(amount):
            raise ValueError(f"outcome values must be finite and >= 0, got {amount}")
        mode = "b" if metric in BINARY_METRICS else "h" if metric in HISTOGRAM_METRICS else "a"
        entries.append((metric, mode, amount))
    return entries


def check_record(write: ExposureWrite) -> None:
    """An exposure record is indexed under the exposure's visitor (for erasure and export): it must not name
    another one."""
    named = (write.record or {}).get("visitor_id", write.visitor_id)
    if named != write.visitor_id:
        raise ValueError("an exposure record must name the exposed visitor")


def record_visitor(raw: str | bytes | None) -> str | None:
    """The visitor an exposure record (JSON) names: its parsed visitor id, or None."""
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    visitor_id = record.get("visitor_id") if isinstance(record, dict) else None
    return visitor_id if isinstance(visitor_id, str) else None


class ExperimentStore(ABC):
    backend: str

    @abstractmethod
    def record_exposure(self, write: ExposureWrite) -> Applied:
        """Count the visitor in the arm (first time only) and add the shown denominators."""

    @abstractmethod
    def record_outcomes(self, writes: Sequence[OutcomeWrite]) -> list[Applied]:
        """Apply outcomes, each at most once per (experiment, event id)."""

    @abstractmethod
    def exposure_records(
        self, experiment_ids: Sequence[str], recommendation_ids: Sequence[str]
    ) -> dict[str, tuple[str, dict[str, Any]]]:
        """recommendation id -> (experiment id, record) for the ids that were experiment exposures."""

    @abstractmethod
    def visitor_heads(
        self, experiment_ids: Sequence[str], visitor_ids: Sequence[str]
    ) -> dict[tuple[str, str], VisitorHead]:
        """(experiment id, visitor id) -> arm and first/last exposure time, for exposed visitors only."""

    @abstractmethod
    def raw_sums(self, experiment_id: str) -> dict[str, float]: ...

    @abstractmethod
    def raw_days(self, experiment_id: str) -> dict[str, float]: ...

    @abstractmethod
    def publish_registry(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the registry of running experiments (read by the profile service's attribution)."""

    @abstractmethod
    def registry(self) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    def forget_visitor(self, experiment_ids: Sequence[str], visitor_id: str) -> int:
        """Erasure: drop the visitor's running values (the anonymous sums stay)."""

    @abstractmethod
    def visitor_experiments(self, visitor_id: str) -> list[str]:
        """Ids of every experiment holding running values of the visitor (running, disabled or removed from the
        config): what an export must cover. Sorted."""

    @abstractmethod
    def erase_visitor(self, visitor_id: str) -> ErasedVisitor:
        """Erasure in every experiment the store holds (running, disabled or removed from the config): the
        visitor's running values and the exposure records that name them. Found through per-visitor indexes
        (exact: the visitor id of the exposure, which its record names), at the cost of what the visitor has,
        not of what the store holds. The anonymous sums stay."""

    @abstractmethod
    def reindex(self) -> Reindexed:
        """Index what a store written before the per-visitor indexes holds, so erasure and export find it.
        Reads everything once: a maintenance step after an upgrade (`selaras experiments reindex`)."""

    @abstractmethod
    def close(self) -> None: ...

    def sums(self, experiment_id: str) -> SumsTree:
        return parse_sums(self.raw_sums(experiment_id))

    def days(self, experiment_id: str) -> dict[str, dict[str, dict[str, Any]]]:
        return parse_days(self.raw_days(experiment_id))
