"""Experiment reports (pure: stored sums in, JSON-ready dict out).

Reports follow docs/statistics.md: per-visitor means, relative uplift with a fixed-horizon and an
always-valid interval (both on the log-ratio scale at small samples), revenue capped at a pre-registered
pooled quantile, Holm across goal metrics × arms, Benjamini–Hochberg across segments, an SRM check, and a
verdict that waits for a minimum sample, decides on the peeking-safe interval and never calls "no
difference" what the fixed-horizon interval calls significant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from services.experiments.assignment import HOLDOUT_ARM
from services.experiments.config import ExperimentConfig
from services.experiments.stats.capping import CAP_QUANTILE, capped_cuped_sums, capped_sums, histogram_cap
from services.experiments.stats.cuped import CupedSums, RatioCupedSums, cuped_uplift
from services.experiments.stats.intervals import ArmSums, mean_and_var, relative_uplift
from services.experiments.stats.multiplicity import benjamini_hochberg, holm
from services.experiments.stats.sequential import always_valid_interval
from services.experiments.stats.srm import srm_check
from services.experiments.store.sums import (
    ALL,
    HISTOGRAM_METRICS,
    RATIO_METRICS,
    parse_covariate_histogram,
    parse_histogram,
)

METRIC_LABELS: Final = {
    "ctr": "clicks per impression",
    "conversion": "share of visitors who bought",
    "revenue": "revenue per visitor (IDR)",
    "add_to_cart": "share of visitors who added to cart",
    "open_rate": "opens per message sent",
}
TIMELINE_DAYS: Final = 120


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
    """The group's CUPED sums for a metric (see store.base.COVARIATE_STATS), None without any
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
    (capping.CAP_QUANTILE of the positive per-visitor values of both arms, from the stored histograms):
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
                "model": arm.model,
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
