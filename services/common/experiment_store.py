"""Experiment sufficient statistics, shared by the recommend service (exposures) and the profile service
(outcomes), on both storage backends.

Unit of analysis is the visitor (see docs/statistics.md). For every experiment, arm and *group* (`all`, one
per slot `slot:<name>`, one per persona frozen at first exposure `seg:<persona>`) the store keeps
n (visitors), Σx, Σx², Σy, Σy², Σxy per metric; each visitor's running x and y live next to them. An
update changes a visitor's value from x to x+δ and adds exactly the increments of docs/statistics.md to the sums,
in one atomic step: a Lua script on Redis, one `BEGIN IMMEDIATE` transaction on SQLite. The applied
increments are returned so the caller can add the same amounts to its Prometheus counters (each process
exports only what it applied, so summing replicas equals the stored totals).

Redis keys of one experiment share the hash tag `{<namespace>:exp:<experiment id>}`, so each script's keys
live in one Redis Cluster slot.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import redis
from prometheus_client import Counter
from redis.cluster import RedisCluster
from redis.exceptions import RedisError

from services.common.clock import wall_time
from services.common.errors import StorageUnavailable
from services.common.settings import CommonSettings
from services.common.storage import DEDUPE_TTL_S, connect_sqlite, make_redis_client

# Metrics measured per visitor. Ratio metrics have a denominator y (impressions or messages sent),
# binary metrics become 1 at the visitor's first qualifying outcome, additive ones sum amounts.
METRICS: Final = ("ctr", "conversion", "revenue", "add_to_cart", "open_rate")
RATIO_METRICS: Final = frozenset({"ctr", "open_rate"})
BINARY_METRICS: Final = frozenset({"conversion", "add_to_cart"})
# Heavy-tailed additive metrics: besides Σx, Σx² the store keeps a log-bucket histogram of the visitors'
# values (per bucket k: visitors, Σx, Σx² as stats "h<k>:n", "h<k>:x", "h<k>:x2"), so the report can cap
# them at a quantile of the pooled data (services/recommend/stats.py, docs/statistics.md). Bucket
# k = ceil(4·log2(x)) covers (2^((k-1)/4), 2^(k/4)]; stats.histogram_from_values uses the same expression.
HISTOGRAM_METRICS: Final = frozenset({"revenue"})
# CUPED: a visitor's pre-exposure value c of a metric (ExposureWrite.covariates, frozen at the first
# exposure) adds, per group and metric, Σc ("c"), Σc² ("c2"), the visitors with a pre-period ("cn"),
# Σc·x ("cx") and Σx over visitors with a pre-period ("cxp"); for ratio metrics also Σc·y ("cy") and
# Σy over them ("cyp"). Visitors without a pre-period (new, or none supplied) are the rest of n: x = 0 plus
# an indicator in the regression (stats.CupedSums / RatioCupedSums, built by experiments.cuped_sums).
COVARIATE_STATS: Final = ("c", "c2", "cn", "cx", "cxp", "cy", "cyp")
BUCKETS_PER_DOUBLING: Final = 4
STATS: Final = ("x", "x2", "y", "y2", "xy")
ALL: Final = "all"
VISITOR_TTL_S: Final = 400 * 86400  # longer than any experiment: an expired visitor would be counted again

# Counters of the applied increments. `slot` is "all" for the whole experiment or a configured slot (or
# channel) name, so label values stay bounded; persona groups are only in the report.
EXPERIMENT_VISITORS = Counter(
    "selaras_experiment_visitors", "Visitors exposed (n), by experiment, arm and slot", ["experiment", "arm", "slot"]
)
_STAT_COUNTERS: Final = {
    "x": Counter(
        "selaras_experiment_value_sum",
        "Σx: sum over visitors of the metric value (numerator of ratio metrics)",
        ["experiment", "arm", "metric", "slot"],
    ),
    "x2": Counter(
        "selaras_experiment_value_squares_sum",
        "Σx²: sum over visitors of the squared metric value",
        ["experiment", "arm", "metric", "slot"],
    ),
    "y": Counter(
        "selaras_experiment_denominator_sum",
        "Σy: sum over visitors of the ratio denominator (impressions, messages sent)",
        ["experiment", "arm", "metric", "slot"],
    ),
    "y2": Counter(
        "selaras_experiment_denominator_squares_sum",
        "Σy²: sum over visitors of the squared denominator",
        ["experiment", "arm", "metric", "slot"],
    ),
    "xy": Counter(
        "selaras_experiment_cross_sum",
        "Σxy: sum over visitors of value × denominator",
        ["experiment", "arm", "metric", "slot"],
    ),
    # CUPED (regression adjustment on the pre-exposure value c of the metric): enough to recompute it.
    "c": Counter(
        "selaras_experiment_covariate_sum",
        "Σc: sum over visitors of the pre-exposure value (CUPED covariate)",
        ["experiment", "arm", "metric", "slot"],
    ),
    "c2": Counter(
        "selaras_experiment_covariate_squares_sum",
        "Σc²: sum over visitors of the squared pre-exposure value",
        ["experiment", "arm", "metric", "slot"],
    ),
    "cn": Counter(
        "selaras_experiment_covariate_visitors",
        "Visitors with a pre-period (the others are new: covariate 0 plus an indicator)",
        ["experiment", "arm", "metric", "slot"],
    ),
    "cx": Counter(
        "selaras_experiment_covariate_cross_sum",
        "Σc·x: sum over visitors of pre-exposure value × metric value",
        ["experiment", "arm", "metric", "slot"],
    ),
    "cxp": Counter(
        "selaras_experiment_value_sum_with_pre_period",
        "Σx over visitors with a pre-period",
        ["experiment", "arm", "metric", "slot"],
    ),
    "cy": Counter(
        "selaras_experiment_covariate_denominator_cross_sum",
        "Σc·y: sum over visitors of pre-exposure value × ratio denominator",
        ["experiment", "arm", "metric", "slot"],
    ),
    "cyp": Counter(
        "selaras_experiment_denominator_sum_with_pre_period",
        "Σy over visitors with a pre-period",
        ["experiment", "arm", "metric", "slot"],
    ),
}


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
class VisitorHead:
    arm: str
    first: float
    last: float


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def clean_label(text: str) -> str:
    """Group names go into `|`-separated field names."""
    return text.replace("|", "/")[:64] or "unknown"


def count_increments(experiment: str, arm: str, increments: Mapping[str, float]) -> None:
    """Add applied increments to this process's counters (the all and slot groups; personas stay out)."""
    for name, amount in increments.items():
        parts = name.split("|")
        group = parts[0]
        if group == ALL:
            slot = ALL
        elif group.startswith("slot:"):
            slot = group[5:]
        else:
            continue
        if len(parts) == 2 and parts[1] == "n":
            EXPERIMENT_VISITORS.labels(experiment, arm, slot).inc(amount)
        elif len(parts) == 3 and parts[2] in _STAT_COUNTERS and amount > 0:
            _STAT_COUNTERS[parts[2]].labels(experiment, arm, parts[1], slot).inc(amount)


def touch_counters(experiment: str, arms: Sequence[str], metrics: Sequence[str], slots: Sequence[str]) -> None:
    """Create the series at 0 so a dead arm shows up in Prometheus (an SRM χ² needs its zero)."""
    for arm in arms:
        for slot in (ALL, *slots):
            EXPERIMENT_VISITORS.labels(experiment, arm, slot)
            for metric in metrics:
                for stat in STATS if metric in RATIO_METRICS else ("x", "x2"):
                    _STAT_COUNTERS[stat].labels(experiment, arm, metric, slot)


SumsTree = dict[str, dict[str, dict[str, Any]]]


def parse_sums(raw: Mapping[str, float]) -> SumsTree:
    """ "arm|group|n" and "arm|group|metric|stat" fields -> {arm: {group: {"n": n, metric: {stat: v}}}}."""
    tree: SumsTree = {}
    for name, value in raw.items():
        parts = name.split("|")
        if len(parts) == 3 and parts[2] == "n":
            tree.setdefault(parts[0], {}).setdefault(parts[1], {})["n"] = value
        elif len(parts) == 4:
            group = tree.setdefault(parts[0], {}).setdefault(parts[1], {})
            group.setdefault(parts[2], {})[parts[3]] = value
    return tree


def parse_days(raw: Mapping[str, float]) -> dict[str, dict[str, dict[str, Any]]]:
    """ "day|arm|n" and "day|arm|metric|stat" -> {day: {arm: {"n": n, metric: {stat: v}}}} (group all)."""
    days: dict[str, dict[str, dict[str, Any]]] = {}
    for name, value in raw.items():
        parts = name.split("|")
        if len(parts) == 3 and parts[2] == "n":
            days.setdefault(parts[0], {}).setdefault(parts[1], {})["n"] = value
        elif len(parts) == 4:
            arm = days.setdefault(parts[0], {}).setdefault(parts[1], {})
            arm.setdefault(parts[2], {})[parts[3]] = value
    return days


def _denominator_args(denominators: Mapping[str, Mapping[str, float]]) -> list[tuple[str, str, float]]:
    entries: list[tuple[str, str, float]] = []
    for group in sorted(denominators):
        for metric in sorted(denominators[group]):
            amount = float(denominators[group][metric])
            if amount < 0 or not math.isfinite(amount):
                raise ValueError(f"denominator increments must be finite and >= 0, got {amount}")
            entries.append((group, metric, amount))
    return entries


def _covariate_args(covariates: Mapping[str, float] | None) -> list[tuple[str, float]]:
    entries: list[tuple[str, float]] = []
    for metric in sorted(covariates or {}):
        if metric not in METRICS:
            raise ValueError(f"unknown metric for a covariate: {metric!r}")
        value = float((covariates or {})[metric])
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"covariates must be finite and >= 0, got {value}")
        entries.append((metric, value))
    return entries


def _value_args(values: Mapping[str, float]) -> list[tuple[str, str, float]]:
    entries: list[tuple[str, str, float]] = []
    for metric in sorted(values):
        amount = float(values[metric])
        if amount < 0 or not math.isfinite(amount):
            raise ValueError(f"outcome values must be finite and >= 0, got {amount}")
        mode = "b" if metric in BINARY_METRICS else "h" if metric in HISTOGRAM_METRICS else "a"
        entries.append((metric, mode, amount))
    return entries


def value_bucket(x: float) -> int:
    """Histogram bucket of a positive value (the Lua script computes the same expression)."""
    return math.ceil(BUCKETS_PER_DOUBLING * math.log(x) / math.log(2.0))


def histogram_increments(x_old: float, d: float, c: float | None = None) -> list[tuple[str, float]]:
    """(stat, amount) to move one visitor's value from x_old to x_old + d (d > 0) in the histogram.

    Within a bucket only Σx and Σx² grow; crossing into another bucket takes the visitor out of the old
    one (negative increments: histograms are Redis/SQLite sums, not Prometheus counters). A visitor with
    a pre-period value c is also counted in the bucket's "cn", "c", "cx" (Σc·x) and "xp" (Σx).
    """
    x_new = x_old + d
    k_new = value_bucket(x_new)
    if x_old > 0 and value_bucket(x_old) == k_new:
        out = [(f"h{k_new}:x", d), (f"h{k_new}:x2", 2 * x_old * d + d * d)]
        if c is not None:
            out += [(f"h{k_new}:cx", c * d), (f"h{k_new}:xp", d)]
        return [(stat, amount) for stat, amount in out if amount != 0.0]
    out = []
    if x_old > 0:
        k_old = value_bucket(x_old)
        out += [(f"h{k_old}:n", -1.0), (f"h{k_old}:x", -x_old), (f"h{k_old}:x2", -x_old * x_old)]
        if c is not None:
            out += [(f"h{k_old}:cn", -1.0), (f"h{k_old}:c", -c), (f"h{k_old}:cx", -c * x_old)]
            out += [(f"h{k_old}:xp", -x_old)]
    out += [(f"h{k_new}:n", 1.0), (f"h{k_new}:x", x_new), (f"h{k_new}:x2", x_new * x_new)]
    if c is not None:
        out += [(f"h{k_new}:cn", 1.0), (f"h{k_new}:c", c), (f"h{k_new}:cx", c * x_new), (f"h{k_new}:xp", x_new)]
    # Like the Lua script, a zero covariate adds no Σc / Σc·x entries.
    return [(stat, amount) for stat, amount in out if amount != 0.0]


def _parse_buckets(stats: Mapping[str, float], names: Sequence[str]) -> dict[int, list[float]]:
    buckets: dict[int, list[float]] = {}
    for name, value in stats.items():
        if not name.startswith("h") or ":" not in name:
            continue
        bucket, _, stat = name[1:].partition(":")
        try:
            k = int(bucket)
        except ValueError:
            continue
        if stat in names:
            buckets.setdefault(k, [0.0] * len(names))[names.index(stat)] += float(value)
    return buckets


def parse_histogram(stats: Mapping[str, float]) -> dict[int, tuple[float, float, float]]:
    """ "h<k>:n|x|x2" stats of one metric -> {k: (visitors, Σx, Σx²)} (stats.Histogram)."""
    return {k: (v[0], v[1], v[2]) for k, v in _parse_buckets(stats, ("n", "x", "x2")).items()}


def parse_covariate_histogram(stats: Mapping[str, float]) -> dict[int, tuple[float, float, float, float]]:
    """ "h<k>:cn|c|cx|xp" -> {k: (visitors with a pre-period, Σc, Σc·x, Σx)} (stats.CovariateHistogram)."""
    return {k: (v[0], v[1], v[2], v[3]) for k, v in _parse_buckets(stats, ("cn", "c", "cx", "xp")).items()}


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
    def erase_visitor(self, visitor_id: str) -> ErasedVisitor:
        """Erasure in every experiment the store holds (running, disabled or removed from the config): the
        visitor's running values and the exposure records that name them (matched on the parsed record's
        visitor id, exactly). The anonymous sums stay."""

    @abstractmethod
    def close(self) -> None: ...

    def sums(self, experiment_id: str) -> SumsTree:
        return parse_sums(self.raw_sums(experiment_id))

    def days(self, experiment_id: str) -> dict[str, dict[str, dict[str, Any]]]:
        return parse_days(self.raw_days(experiment_id))


# ------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------

# Shared by both scripts: add an increment to the sums (and the per-day sums for group "all") and
# remember it for the caller. string.format keeps 17 significant digits (tostring keeps 14).
_LUA_COMMON = """
local sums, days = KEYS[2], KEYS[3]
local out = {}
local function fmt(v) return string.format('%.17g', v) end
local function add(arm, day, group, name, v)
  redis.call('HINCRBYFLOAT', sums, arm .. '|' .. group .. '|' .. name, fmt(v))
  if group == 'all' then redis.call('HINCRBYFLOAT', days, day .. '|' .. arm .. '|' .. name, fmt(v)) end
  out[#out + 1] = group .. '|' .. name
  out[#out + 1] = fmt(v)
end
local function num(v) if v then return tonumber(v) end return 0 end
local METRICS = {__METRICS__}
-- CUPED: the visitor's frozen pre-exposure value of a metric, or nil (no pre-period).
local function covariate(visitor, metric)
  local c = redis.call('HGET', visitor, 'cov|' .. metric)
  if c then return tonumber(c) end
  return nil
end
""".replace("__METRICS__", ", ".join(f"'{m}'" for m in METRICS))

# KEYS: visitor, sums, days, record, then (with a recommendation id) the recommendation's "exposed" marker.
# ARGV: arm, segment, ts, day, record json ('' = none), record ttl, visitor ttl, entry count, then (group,
# metric, dy) triples, then a covariate count and (metric, value) pairs. The segment and the covariates are
# frozen at first exposure.
_EXPOSURE_SCRIPT = (
    _LUA_COMMON
    + """
local visitor = KEYS[1]
local arm, seg, ts, day = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local current = redis.call('HGET', visitor, 'arm')
if current and current ~= arm then return {'arm_conflict', current} end
-- KEYS[5] (with a recommendation id): one exposure per recommendation, so a re-sent script adds nothing.
if KEYS[5] and not redis.call('SET', KEYS[5], '1', 'NX', 'EX', tonumber(ARGV[6])) then return {'duplicate', arm} end
local count = tonumber(ARGV[8])
if not current then
  redis.call('HSET', visitor, 'arm', arm, 'seg', seg, 'first', ARGV[3], 'last', ARGV[3])
  local base = 9 + 3 * count
  for i = 0, tonumber(ARGV[base]) - 1 do
    redis.call('HSET', visitor, 'cov|' .. ARGV[base + 1 + 2 * i], ARGV[base + 2 + 2 * i])
  end
else
  seg = redis.call('HGET', visitor, 'seg')
  if ts > num(redis.call('HGET', visitor, 'last')) then redis.call('HSET', visitor, 'last', ARGV[3]) end
  if ts < num(redis.call('HGET', visitor, 'first')) then redis.call('HSET', visitor, 'first', ARGV[3]) end
end
local segment = 'seg:' .. seg
local function enter(group)
  if redis.call('HSETNX', visitor, group .. '|n', '1') == 1 then
    add(arm, day, group, 'n', 1)
    for _, metric in ipairs(METRICS) do
      local c = covariate(visitor, metric)
      if c then
        if c > 0 then
          add(arm, day, group, metric .. '|c', c)
          add(arm, day, group, metric .. '|c2', c * c)
        end
        add(arm, day, group, metric .. '|cn', 1)
      end
    end
  end
end
enter('all')
enter(segment)
for i = 0, count - 1 do
  local group, metric, dy = ARGV[9 + 3 * i], ARGV[10 + 3 * i], tonumber(ARGV[11 + 3 * i])
  local groups = {group}
  if group == 'all' then groups = {'all', segment} else enter(group) end
  if dy > 0 then
    for _, g in ipairs(groups) do
      local base = g .. '|' .. metric
      local y_old = num(redis.call('HGET', visitor, base .. '|y'))
      local x_old = num(redis.call('HGET', visitor, base .. '|x'))
      redis.call('HINCRBYFLOAT', visitor, base .. '|y', fmt(dy))
      add(arm, day, g, metric .. '|y', dy)
      add(arm, day, g, metric .. '|y2', 2 * y_old * dy + dy * dy)
      if x_old > 0 then add(arm, day, g, metric .. '|xy', x_old * dy) end
      local c = covariate(visitor, metric)
      if c then
        if c > 0 then add(arm, day, g, metric .. '|cy', c * dy) end
        add(arm, day, g, metric .. '|cyp', dy)
      end
    end
  end
end
if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5], 'EX', tonumber(ARGV[6])) end
redis.call('EXPIRE', visitor, tonumber(ARGV[7]))
local result = {'ok', arm}
for i = 1, #out do result[#result + 1] = out[i] end
return result
"""
)

# KEYS: visitor, sums, days, seen. ARGV: expected arm ('' = any), ts, day, lower, upper, window ('' = unset),
# seen ttl, slot group ('' = none), entry count, then (metric, mode b|a, dx) triples.
_OUTCOME_SCRIPT = (
    _LUA_COMMON
    + """
local visitor = KEYS[1]
local ts, day = tonumber(ARGV[2]), ARGV[3]
local head = redis.call('HMGET', visitor, 'arm', 'seg', 'first', 'last')
local arm = head[1]
if not arm then return {'not_exposed'} end
if ARGV[1] ~= '' and ARGV[1] ~= arm then return {'arm_mismatch', arm} end
if ARGV[4] ~= '' and ts < tonumber(ARGV[4]) then return {'outside_window', arm} end
if ARGV[5] ~= '' and ts > tonumber(ARGV[5]) then return {'outside_window', arm} end
if ARGV[6] ~= '' and (ts < num(head[3]) or ts > num(head[4]) + tonumber(ARGV[6])) then
  return {'outside_window', arm}
end
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', tonumber(ARGV[7])) then return {'duplicate', arm} end
local groups = {'all', 'seg:' .. head[2]}
if ARGV[8] ~= '' and redis.call('HEXISTS', visitor, ARGV[8] .. '|n') == 1 then groups[#groups + 1] = ARGV[8] end
local count = tonumber(ARGV[9])
for i = 0, count - 1 do
  local metric, mode, dx = ARGV[10 + 3 * i], ARGV[11 + 3 * i], tonumber(ARGV[12 + 3 * i])
  for _, g in ipairs(groups) do
    local base = g .. '|' .. metric
    local x_old = num(redis.call('HGET', visitor, base .. '|x'))
    local y_old = num(redis.call('HGET', visitor, base .. '|y'))
    local d = dx
    if mode == 'b' then
      if x_old > 0 then d = 0 else d = 1 end
    end
    if d > 0 then
      redis.call('HINCRBYFLOAT', visitor, base .. '|x', fmt(d))
      add(arm, day, g, metric .. '|x', d)
      add(arm, day, g, metric .. '|x2', 2 * x_old * d + d * d)
      if y_old > 0 then add(arm, day, g, metric .. '|xy', y_old * d) end
      local c = covariate(visitor, metric)
      if c then
        if c > 0 then add(arm, day, g, metric .. '|cx', c * d) end
        add(arm, day, g, metric .. '|cxp', d)
      end
      if mode == 'h' then
        -- histogram_increments in Python: the same bucket expression and moves. For visitors with a
        -- pre-period the bucket also keeps their count, Σc, Σc·x and Σx (CUPED on capped values).
        local x_new = x_old + d
        local k_new = math.ceil(4 * math.log(x_new) / math.log(2))
        local h_new = metric .. '|h' .. string.format('%d', k_new)
        if x_old > 0 and math.ceil(4 * math.log(x_old) / math.log(2)) == k_new then
          add(arm, day, g, h_new .. ':x', d)
          add(arm, day, g, h_new .. ':x2', 2 * x_old * d + d * d)
          if c then
            if c > 0 then add(arm, day, g, h_new .. ':cx', c * d) end
            add(arm, day, g, h_new .. ':xp', d)
          end
        else
          if x_old > 0 then
            local h_old = metric .. '|h' .. string.format('%d', math.ceil(4 * math.log(x_old) / math.log(2)))
            add(arm, day, g, h_old .. ':n', -1)
            add(arm, day, g, h_old .. ':x', -x_old)
            add(arm, day, g, h_old .. ':x2', -x_old * x_old)
            if c then
              add(arm, day, g, h_old .. ':cn', -1)
              if c > 0 then
                add(arm, day, g, h_old .. ':c', -c)
                add(arm, day, g, h_old .. ':cx', -c * x_old)
              end
              add(arm, day, g, h_old .. ':xp', -x_old)
            end
          end
          add(arm, day, g, h_new .. ':n', 1)
          add(arm, day, g, h_new .. ':x', x_new)
          add(arm, day, g, h_new .. ':x2', x_new * x_new)
          if c then
            add(arm, day, g, h_new .. ':cn', 1)
            if c > 0 then
              add(arm, day, g, h_new .. ':c', c)
              add(arm, day, g, h_new .. ':cx', c * x_new)
            end
            add(arm, day, g, h_new .. ':xp', x_new)
          end
        end
      end
    end
  end
end
local result = {'ok', arm}
for i = 1, #out do result[#result + 1] = out[i] end
return result
"""
)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _applied(result: Sequence[Any]) -> Applied:
    status = _decode(result[0])
    arm = _decode(result[1]) if len(result) > 1 else ""
    increments: dict[str, float] = {}
    for i in range(2, len(result) - 1, 2):
        name = _decode(result[i])
        increments[name] = increments.get(name, 0.0) + float(_decode(result[i + 1]))
    return Applied(status, arm, increments)


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _names(raw: str | bytes, visitor_id: str) -> bool:
    """Whether an exposure record (JSON) is the visitor's: the parsed visitor id, not a substring."""
    try:
        record = json.loads(raw)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("visitor_id") == visitor_id


def _opt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class RedisExperimentStore(ExperimentStore):
    backend = "redis"

    def __init__(self, client: redis.Redis | RedisCluster, namespace: str):
        self.client = client
        self.ns = namespace
        self.registry_key = f"{namespace}:experiments:registry"
        # RedisCluster has the same register_script; the stubs only declare it on Redis.
        scripts = cast(redis.Redis, client)
        self._exposure = scripts.register_script(_EXPOSURE_SCRIPT)
        self._outcome = scripts.register_script(_OUTCOME_SCRIPT)

    def _tag(self, experiment_id: str) -> str:
        return f"{{{self.ns}:exp:{experiment_id}}}"

    def _keys(self, experiment_id: str, visitor_id: str) -> list[str]:
        tag = self._tag(experiment_id)
        return [f"{tag}:v:{visitor_id}", f"{tag}:sums", f"{tag}:days"]

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except RedisError as exc:
            raise StorageUnavailable(f"experiment store unavailable: {type(exc).__name__}") from exc

    def record_exposure(self, write: ExposureWrite) -> Applied:
        entries = _denominator_args(write.denominators)
        tag = self._tag(write.experiment_id)
        keys = [*self._keys(write.experiment_id, write.visitor_id), f"{tag}:rec:{write.recommendation_id or ''}"]
        if write.recommendation_id:
            keys.append(f"{tag}:exposed:{write.recommendation_id}")
        record = json.dumps(write.record, separators=(",", ":")) if write.record and write.recommendation_id else ""
        args: list[Any] = [
            write.arm,
            clean_label(write.segment),
            repr(float(write.ts)),
            day_of(write.ts),
            record,
            write.record_ttl_s,
            VISITOR_TTL_S,
            len(entries),
        ]
        for entry in entries:
            args.extend(entry)
        covariates = _covariate_args(write.covariates)
        args.append(len(covariates))
        for metric, value in covariates:
            args.extend((metric, repr(value)))
        result = self._call(lambda: self._exposure(keys=keys, args=args))
        return _applied(cast(list[Any], result))

    def record_outcomes(self, writes: Sequence[OutcomeWrite]) -> list[Applied]:
        if not writes:
            return []

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for write in writes:
                entries = _value_args(write.values)
                keys = [
                    *self._keys(write.experiment_id, write.visitor_id),
                    f"{self._tag(write.experiment_id)}:seen:{write.event_id}",
                ]
                args: list[Any] = [
                    write.expected_arm or "",
                    repr(float(write.ts)),
                    day_of(write.ts),
                    _opt(write.lower),
                    _opt(write.upper),
                    _opt(write.window_s),
                    DEDUPE_TTL_S,
                    write.slot_group or "",
                    len(entries),
                ]
                for entry in entries:
                    args.extend(entry)
                self._outcome(keys=keys, args=args, client=pipe)
            return cast(list[Any], pipe.execute())

        return [_applied(result) for result in self._call(run)]

    def exposure_records(
        self, experiment_ids: Sequence[str], recommendation_ids: Sequence[str]
    ) -> dict[str, tuple[str, dict[str, Any]]]:
        pairs = [(e, r) for r in dict.fromkeys(recommendation_ids) for e in experiment_ids]
        if not pairs:
            return {}

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for experiment_id, recommendation_id in pairs:
                pipe.get(f"{self._tag(experiment_id)}:rec:{recommendation_id}")
            return cast(list[Any], pipe.execute())

        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for (experiment_id, recommendation_id), raw in zip(pairs, self._call(run), strict=True):
            if raw and recommendation_id not in found:
                found[recommendation_id] = (experiment_id, json.loads(raw))
        return found

    def visitor_heads(
        self, experiment_ids: Sequence[str], visitor_ids: Sequence[str]
    ) -> dict[tuple[str, str], VisitorHead]:
        pairs = [(e, v) for v in dict.fromkeys(visitor_ids) for e in experiment_ids]
        if not pairs:
            return {}

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for experiment_id, visitor_id in pairs:
                pipe.hmget(self._keys(experiment_id, visitor_id)[0], ["arm", "first", "last"])
            return cast(list[Any], pipe.execute())

        heads: dict[tuple[str, str], VisitorHead] = {}
        for pair, (arm, first, last) in zip(pairs, self._call(run), strict=True):
            if arm is not None:
                heads[pair] = VisitorHead(_decode(arm), float(first or 0), float(last or 0))
        return heads

    def _hash_floats(self, key: str) -> dict[str, float]:
        raw = cast(dict[bytes, bytes], self._call(lambda: self.client.hgetall(key)))
        return {k.decode(): float(v) for k, v in raw.items()}

    def raw_sums(self, experiment_id: str) -> dict[str, float]:
        return self._hash_floats(f"{self._tag(experiment_id)}:sums")

    def raw_days(self, experiment_id: str) -> dict[str, float]:
        return self._hash_floats(f"{self._tag(experiment_id)}:days")

    def publish_registry(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        def run() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.registry_key)
            if entries:
                pipe.hset(self.registry_key, mapping={k: json.dumps(v) for k, v in entries.items()})
            pipe.execute()

        self._call(run)

    def registry(self) -> dict[str, dict[str, Any]]:
        raw = cast(dict[bytes, bytes], self._call(lambda: self.client.hgetall(self.registry_key)))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def forget_visitor(self, experiment_ids: Sequence[str], visitor_id: str) -> int:
        return sum(
            int(self._call(lambda e=e: self.client.delete(self._keys(e, visitor_id)[0]))) for e in experiment_ids
        )

    def erase_visitor(self, visitor_id: str) -> ErasedVisitor:
        # Erasure is rare: a SCAN over the experiment keys is acceptable. The patterns narrow the scan; the
        # exact checks below decide (a visitor id may contain glob characters or "}:v:").
        prefix = "{" + self.ns + ":exp:"

        def scan(pattern: str) -> list[str]:
            return [_decode(k) for k in self.client.scan_iter(match=pattern, count=1000)]

        values = [
            key
            for key in self._call(lambda: scan(_glob_escape(prefix) + "*" + _glob_escape("}:v:" + visitor_id)))
            if key[len(prefix) :].split("}:v:", 1)[-1] == visitor_id
        ]
        records = self._call(lambda: scan(_glob_escape(prefix) + "*}:rec:*"))
        doomed: list[str] = []
        for start in range(0, len(records), 500):
            chunk = records[start : start + 500]
            raws = self._call(lambda chunk=chunk: [self.client.get(k) for k in chunk])
            doomed.extend(k for k, raw in zip(chunk, raws, strict=True) if raw and _names(raw, visitor_id))
        # One key per call: in a cluster the keys live in different slots.
        deleted_values = sum(int(self._call(lambda k=k: self.client.delete(k))) for k in values)
        deleted_records = sum(int(self._call(lambda k=k: self.client.delete(k))) for k in doomed)
        return ErasedVisitor(deleted_values, deleted_records)

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------------------------
# SQLite (embedded mode): the same algorithm as the Lua scripts, inside one transaction.
# ------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exp_sums (exp TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (exp, name));
CREATE TABLE IF NOT EXISTS exp_days (exp TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (exp, name));
CREATE TABLE IF NOT EXISTS exp_visitors (exp TEXT NOT NULL, visitor_id TEXT NOT NULL, data TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (exp, visitor_id));
CREATE TABLE IF NOT EXISTS exp_records (exp TEXT NOT NULL, rec_id TEXT NOT NULL, data TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (exp, rec_id));
CREATE TABLE IF NOT EXISTS exp_seen (exp TEXT NOT NULL, event_id TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (exp, event_id));
CREATE TABLE IF NOT EXISTS exp_registry (key TEXT PRIMARY KEY, data TEXT NOT NULL);
"""


class _Tx:
    """Increments collected inside one transaction, written at the end."""

    def __init__(self, arm: str, day: str):
        self.arm = arm
        self.day = day
        self.out: dict[str, float] = {}

    def add(self, group: str, name: str, value: float) -> None:
        key = f"{group}|{name}"
        self.out[key] = self.out.get(key, 0.0) + value


class SqliteExperimentStore(ExperimentStore):
    backend = "sqlite"

    def __init__(self, path: Any):
        # A connection of its own (the event store has another); WAL lets both services share the file.
        self._conn = connect_sqlite(Path(path), _SCHEMA)
        self._lock = threading.Lock()

    def _transaction(self, fn: Any) -> Any:
        try:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(self._conn)
                    self._conn.execute("COMMIT")
                    return result
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"experiment store unavailable: {type(exc).__name__}") from exc

    def _read(self, fn: Any) -> Any:
        try:
            with self._lock:
                return fn(self._conn)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"experiment store unavailable: {type(exc).__name__}") from exc

    @staticmethod
    def _visitor(conn: sqlite3.Connection, experiment_id: str, visitor_id: str) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT data FROM exp_visitors WHERE exp = ? AND visitor_id = ? AND expires_at > ?",
            (experiment_id, visitor_id, wall_time()),
        ).fetchone()
        return cast(dict[str, Any], json.loads(row[0])) if row else None

    @staticmethod
    def _flush(conn: sqlite3.Connection, experiment_id: str, tx: _Tx) -> None:
        upsert = " ON CONFLICT (exp, name) DO UPDATE SET value = value + excluded.value"
        conn.executemany(
            "INSERT INTO exp_sums (exp, name, value) VALUES (?, ?, ?)" + upsert,
            [(experiment_id, f"{tx.arm}|{name}", v) for name, v in tx.out.items()],
        )
        conn.executemany(
            "INSERT INTO exp_days (exp, name, value) VALUES (?, ?, ?)" + upsert,
            [
                (experiment_id, f"{tx.day}|{tx.arm}|{name[len(ALL) + 1 :]}", v)
                for name, v in tx.out.items()
                if name.startswith(ALL + "|")
            ],
        )

    def record_exposure(self, write: ExposureWrite) -> Applied:
        entries = _denominator_args(write.denominators)
        covariates = _covariate_args(write.covariates)

        def run(conn: sqlite3.Connection) -> Applied:
            visitor = self._visitor(conn, write.experiment_id, write.visitor_id)
            if visitor is not None and visitor["arm"] != write.arm:
                return Applied("arm_conflict", str(visitor["arm"]))
            # One exposure per recommendation (its stored record marks it), as the Redis script does.
            if (
                write.record
                and write.recommendation_id
                and conn.execute(
                    "SELECT 1 FROM exp_records WHERE exp = ? AND rec_id = ? AND expires_at > ?",
                    (write.experiment_id, write.recommendation_id, wall_time()),
                ).fetchone()
            ):
                return Applied("duplicate", write.arm)
            if visitor is None:
                visitor = {"arm": write.arm, "seg": clean_label(write.segment), "first": write.ts, "last": write.ts}
                visitor.update({f"cov|{metric}": value for metric, value in covariates})
            else:
                visitor["last"] = max(float(visitor["last"]), write.ts)
                visitor["first"] = min(float(visitor["first"]), write.ts)
            tx = _Tx(write.arm, day_of(write.ts))
            segment = f"seg:{visitor['seg']}"

            def enter(group: str) -> None:
                if f"{group}|n" not in visitor:
                    visitor[f"{group}|n"] = 1.0
                    tx.add(group, "n", 1.0)
                    for metric in METRICS:
                        c = visitor.get(f"cov|{metric}")
                        if c is not None:
                            if c > 0:
                                tx.add(group, f"{metric}|c", c)
                                tx.add(group, f"{metric}|c2", c * c)
                            tx.add(group, f"{metric}|cn", 1.0)

            enter(ALL)
            enter(segment)
            for group, metric, dy in entries:
                groups = [ALL, segment] if group == ALL else [group]
                if group != ALL:
                    enter(group)
                if dy <= 0:
                    continue
                for g in groups:
                    base = f"{g}|{metric}"
                    y_old = float(visitor.get(f"{base}|y", 0.0))
                    x_old = float(visitor.get(f"{base}|x", 0.0))
                    visitor[f"{base}|y"] = y_old + dy
                    tx.add(g, f"{metric}|y", dy)
                    tx.add(g, f"{metric}|y2", 2 * y_old * dy + dy * dy)
                    if x_old > 0:
                        tx.add(g, f"{metric}|xy", x_old * dy)
                    c = visitor.get(f"cov|{metric}")
                    if c is not None:
                        if c > 0:
                            tx.add(g, f"{metric}|cy", c * dy)
                        tx.add(g, f"{metric}|cyp", dy)
            now = wall_time()
            conn.execute(
                "INSERT INTO exp_visitors (exp, visitor_id, data, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (exp, visitor_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
                (write.experiment_id, write.visitor_id, json.dumps(visitor), now + VISITOR_TTL_S),
            )
            if write.record and write.recommendation_id:
                conn.execute(
                    "INSERT OR REPLACE INTO exp_records (exp, rec_id, data, expires_at) VALUES (?, ?, ?, ?)",
                    (write.experiment_id, write.recommendation_id, json.dumps(write.record), now + write.record_ttl_s),
                )
            self._flush(conn, write.experiment_id, tx)
            return Applied("ok", write.arm, tx.out)

        return cast(Applied, self._transaction(run))

    def _outcome(self, conn: sqlite3.Connection, write: OutcomeWrite) -> Applied:
        visitor = self._visitor(conn, write.experiment_id, write.visitor_id)
        if visitor is None:
            return Applied("not_exposed")
        arm = str(visitor["arm"])
        if write.expected_arm and write.expected_arm != arm:
            return Applied("arm_mismatch", arm)
        ts = write.ts
        if (write.lower is not None and ts < write.lower) or (write.upper is not None and ts > write.upper):
            return Applied("outside_window", arm)
        if write.window_s is not None and not (
            float(visitor["first"]) <= ts <= float(visitor["last"]) + write.window_s
        ):
            return Applied("outside_window", arm)
        now = wall_time()
        conn.execute("DELETE FROM exp_seen WHERE exp = ? AND event_id = ? AND expires_at <= ?", (
            write.experiment_id, write.event_id, now))  # fmt: skip
        inserted = conn.execute(
            "INSERT OR IGNORE INTO exp_seen (exp, event_id, expires_at) VALUES (?, ?, ?)",
            (write.experiment_id, write.event_id, now + DEDUPE_TTL_S),
        ).rowcount
        if inserted != 1:
            return Applied("duplicate", arm)
        groups = [ALL, f"seg:{visitor['seg']}"]
        if write.slot_group and f"{write.slot_group}|n" in visitor:
            groups.append(write.slot_group)
        tx = _Tx(arm, day_of(ts))
        for metric, mode, dx in _value_args(write.values):
            for g in groups:
                base = f"{g}|{metric}"
                x_old = float(visitor.get(f"{base}|x", 0.0))
                y_old = float(visitor.get(f"{base}|y", 0.0))
                d = (0.0 if x_old > 0 else 1.0) if mode == "b" else dx
                if d <= 0:
                    continue
                visitor[f"{base}|x"] = x_old + d
                tx.add(g, f"{metric}|x", d)
                tx.add(g, f"{metric}|x2", 2 * x_old * d + d * d)
                if y_old > 0:
                    tx.add(g, f"{metric}|xy", y_old * d)
                c = visitor.get(f"cov|{metric}")
                if c is not None:
                    if c > 0:
                        tx.add(g, f"{metric}|cx", c * d)
                    tx.add(g, f"{metric}|cxp", d)
                if mode == "h":
                    for stat, amount in histogram_increments(x_old, d, c):
                        tx.add(g, f"{metric}|{stat}", amount)
        conn.execute(
            "UPDATE exp_visitors SET data = ? WHERE exp = ? AND visitor_id = ?",
            (json.dumps(visitor), write.experiment_id, write.visitor_id),
        )
        self._flush(conn, write.experiment_id, tx)
        return Applied("ok", arm, tx.out)

    def record_outcomes(self, writes: Sequence[OutcomeWrite]) -> list[Applied]:
        if not writes:
            return []
        return cast(list[Applied], self._transaction(lambda conn: [self._outcome(conn, w) for w in writes]))

    def exposure_records(
        self, experiment_ids: Sequence[str], recommendation_ids: Sequence[str]
    ) -> dict[str, tuple[str, dict[str, Any]]]:
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        if not experiment_ids or not recommendation_ids:
            return found
        now = wall_time()

        def run(conn: sqlite3.Connection) -> None:
            for recommendation_id in dict.fromkeys(recommendation_ids):
                for experiment_id in experiment_ids:
                    row = conn.execute(
                        "SELECT data FROM exp_records WHERE exp = ? AND rec_id = ? AND expires_at > ?",
                        (experiment_id, recommendation_id, now),
                    ).fetchone()
                    if row:
                        found[recommendation_id] = (experiment_id, json.loads(row[0]))
                        break

        self._read(run)
        return found

    def visitor_heads(
        self, experiment_ids: Sequence[str], visitor_ids: Sequence[str]
    ) -> dict[tuple[str, str], VisitorHead]:
        heads: dict[tuple[str, str], VisitorHead] = {}

        def run(conn: sqlite3.Connection) -> None:
            for visitor_id in dict.fromkeys(visitor_ids):
                for experiment_id in experiment_ids:
                    visitor = self._visitor(conn, experiment_id, visitor_id)
                    if visitor is not None:
                        heads[(experiment_id, visitor_id)] = VisitorHead(
                            str(visitor["arm"]), float(visitor["first"]), float(visitor["last"])
                        )

        self._read(run)
        return heads

    def raw_sums(self, experiment_id: str) -> dict[str, float]:
        rows = self._read(
            lambda c: c.execute("SELECT name, value FROM exp_sums WHERE exp = ?", (experiment_id,)).fetchall()
        )
        return {name: float(value) for name, value in rows}

    def raw_days(self, experiment_id: str) -> dict[str, float]:
        rows = self._read(
            lambda c: c.execute("SELECT name, value FROM exp_days WHERE exp = ?", (experiment_id,)).fetchall()
        )
        return {name: float(value) for name, value in rows}

    def publish_registry(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM exp_registry")
            conn.executemany(
                "INSERT INTO exp_registry (key, data) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in entries.items()]
            )

        self._transaction(run)

    def registry(self) -> dict[str, dict[str, Any]]:
        rows = self._read(lambda c: c.execute("SELECT key, data FROM exp_registry").fetchall())
        return {key: json.loads(data) for key, data in rows}

    def forget_visitor(self, experiment_ids: Sequence[str], visitor_id: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute("DELETE FROM exp_visitors WHERE exp = ? AND visitor_id = ?", (e, visitor_id)).rowcount
                for e in experiment_ids
            )

        return cast(int, self._transaction(run))

    def erase_visitor(self, visitor_id: str) -> ErasedVisitor:
        def run(conn: sqlite3.Connection) -> ErasedVisitor:
            values = conn.execute("DELETE FROM exp_visitors WHERE visitor_id = ?", (visitor_id,)).rowcount
            rows = conn.execute("SELECT exp, rec_id, data FROM exp_records").fetchall()
            doomed = [(exp, rec_id) for exp, rec_id, data in rows if _names(data, visitor_id)]
            conn.executemany("DELETE FROM exp_records WHERE exp = ? AND rec_id = ?", doomed)
            return ErasedVisitor(int(values), len(doomed))

        return cast(ErasedVisitor, self._transaction(run))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_experiment_store(settings: CommonSettings) -> ExperimentStore:
    """Redis when REDIS_URL is set (Lua scripts), the embedded SQLite file otherwise."""
    if settings.redis_url:
        client = make_redis_client(settings.redis_url, settings.redis_cluster, settings.redis_timeout_s)
        return RedisExperimentStore(client, settings.namespace)
    settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteExperimentStore(settings.sqlite_path)
