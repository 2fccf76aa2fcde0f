"""The layout of an experiment's stored sums, shared by both backends and by the reports: the metrics and
their statistics, the field names ("arm|group|n", "arm|group|metric|stat", per-day "day|arm|..."), the revenue
histograms, and the Prometheus counters that mirror the applied increments.

Unit of analysis is the visitor (see docs/statistics.md). For every experiment, arm and *group* (`all`, one
per slot `slot:<name>`, one per persona frozen at first exposure `seg:<persona>`) the store keeps
n (visitors), Σx, Σx², Σy, Σy², Σxy per metric. Pure: no storage here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from prometheus_client import Counter

# Metrics measured per visitor. Ratio metrics have a denominator y (impressions or messages sent),
# binary metrics become 1 at the visitor's first qualifying outcome, additive ones sum amounts.
METRICS: Final = ("ctr", "conversion", "revenue", "add_to_cart", "open_rate")
RATIO_METRICS: Final = frozenset({"ctr", "open_rate"})
BINARY_METRICS: Final = frozenset({"conversion", "add_to_cart"})
# Heavy-tailed additive metrics: besides Σx, Σx² the store keeps a log-bucket histogram of the visitors'
# values (per bucket k: visitors, Σx, Σx² as stats "h<k>:n", "h<k>:x", "h<k>:x2"), so the report can cap
# them at a quantile of the pooled data (services/experiments/stats/capping.py, docs/statistics.md). Bucket
# k = ceil(4·log2(x)) covers (2^((k-1)/4), 2^(k/4)]; capping.histogram_from_values uses the same expression.
HISTOGRAM_METRICS: Final = frozenset({"revenue"})
# CUPED: a visitor's pre-exposure value c of a metric (ExposureWrite.covariates, frozen at the first
# exposure) adds, per group and metric, Σc ("c"), Σc² ("c2"), the visitors with a pre-period ("cn"),
# Σc·x ("cx") and Σx over visitors with a pre-period ("cxp"); for ratio metrics also Σc·y ("cy") and
# Σy over them ("cyp"). Visitors without a pre-period (new, or none supplied) are the rest of n: x = 0 plus
# an indicator in the regression (stats.cuped.CupedSums / RatioCupedSums, built by report.cuped_sums).
COVARIATE_STATS: Final = ("c", "c2", "cn", "cx", "cxp", "cy", "cyp")
BUCKETS_PER_DOUBLING: Final = 4
STATS: Final = ("x", "x2", "y", "y2", "xy")
ALL: Final = "all"

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
                ratio = metric in RATIO_METRICS
                for stat in STATS if ratio else ("x", "x2"):
                    _STAT_COUNTERS[stat].labels(experiment, arm, metric, slot)
                # CUPED's sums too: an arm without pre-period visitors reads 0, not "no data".
                for stat in COVARIATE_STATS if ratio else ("c", "c2", "cn", "cx", "cxp"):
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
    """ "h<k>:n|x|x2" stats of one metric -> {k: (visitors, Σx, Σx²)} (stats.capping.Histogram)."""
    return {k: (v[0], v[1], v[2]) for k, v in _parse_buckets(stats, ("n", "x", "x2")).items()}


def parse_covariate_histogram(stats: Mapping[str, float]) -> dict[int, tuple[float, float, float, float]]:
    """ "h<k>:cn|c|cx|xp" -> {k: (visitors with a pre-period, Σc, Σc·x, Σx)} (stats.capping.CovariateHistogram)."""
    return {k: (v[0], v[1], v[2], v[3]) for k, v in _parse_buckets(stats, ("cn", "c", "cx", "xp")).items()}
