"""The printed report of `selaras simulate-ab`: the arms (with the ranking or ranker version each serves), uplift
over control, the CUPED adjustment, SRM and verdict, and a summary of the headline numbers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from services.demo.simulate_ab import AbResult


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:+.{digits}%}"


def _p(value: float | None) -> str:
    return "–" if value is None else ("<0.0001" if value < 0.0001 else f"{value:.4f}")


def print_report(
    console: Console,
    report: Mapping[str, Any],
    title: str | None = None,
    arm_models: Mapping[str, str] | None = None,
) -> None:
    """The report as tables: arms (with the ranking or ranker version each serves), uplift over control,
    the CUPED adjustment, SRM and verdict. `arm_models`: arm -> ranker version (model vs model)."""
    arm_models = arm_models or {}
    arms = Table(title=title or f"experiment {report['key']}")
    arms.add_column("arm")
    arms.add_column("ranking")
    arms.add_column("visitors", justify="right")
    metrics = [m["name"] for m in report["metrics"]]
    for metric in metrics:
        arms.add_column(metric, justify="right")
    for arm in report["arms"]:
        values = []
        for metric in metrics:
            mean = arm["metrics"][metric]["mean"]
            values.append("–" if mean is None else (f"{mean:,.0f}" if metric == "revenue" else f"{mean:.2%}"))
        ranking = "personalized" if arm["personalized"] else "generic"
        model = arm.get("model") or arm_models.get(arm["name"])  # reports that name the arm's model show it
        if model:
            ranking = f"model {model}"
        arms.add_row(arm["name"], ranking, f"{arm['n']:,.0f}", *values)
    console.print(arms)
    results = Table(title="uplift over control")
    for column in ("metric", "arm", "uplift", "95% CI", "always-valid CI", "p-value", "p (Holm)", "chance to win"):
        results.add_column(column, justify="left" if column in ("metric", "arm") else "right")
    for r in report["results"]:
        results.add_row(
            r["metric"],
            r["arm"],
            _pct(r["uplift"]),
            f"{_pct(r['ci_lower'])} … {_pct(r['ci_upper'])}",
            f"{_pct(r['always_valid']['ci_lower'])} … {_pct(r['always_valid']['ci_upper'])}",
            _p(r["p_value"]),
            _p(r["p_value_holm"]),
            "–" if r["chance_to_win"] is None else f"{r['chance_to_win']:.1%}",
        )
    console.print(results)
    print_cuped(console, report)
    srm = report["srm"]
    status = "[red]SAMPLE RATIO MISMATCH[/]" if srm["flagged"] else "ok"
    chi2 = "–" if srm["chi2"] is None else f"{srm['chi2']:.3f}"
    console.print(f"SRM: {status} (χ² = {chi2}, p = {_p(srm['p_value'])})")
    verdict = report["verdict"]
    console.print(f"verdict: [bold]{verdict['decision']}[/] (ready: {verdict['ready']})")
    for reason in verdict["reasons"]:
        console.print(f"  - {reason['text']}")


def print_cuped(console: Console, report: Mapping[str, Any]) -> None:
    """The CUPED (regression on the pre-period) comparison beside the unadjusted one, per metric."""
    table = Table(title="CUPED: adjusted on the visitors' pre-period")
    for column in ("metric", "arm", "uplift", "95% CI", "unadjusted CI", "variance reduction", "with pre-period"):
        table.add_column(column, justify="left" if column in ("metric", "arm") else "right")
    for r in report["results"]:
        cuped = r.get("cuped")
        unadjusted = f"{_pct(r['ci_lower'])} … {_pct(r['ci_upper'])}"
        if not cuped:
            table.add_row(r["metric"], r["arm"], "–", "no pre-period data", unadjusted, "–", "0")
            continue
        reduction = cuped["variance_reduction_pct"]
        with_pre = cuped["visitors_with_pre_period"]
        table.add_row(
            r["metric"],
            r["arm"],
            _pct(cuped["uplift"]),
            f"{_pct(cuped['ci_lower'])} … {_pct(cuped['ci_upper'])}",
            unadjusted,
            "–" if reduction is None else f"{reduction:.1f}%",
            f"{with_pre['control'] + with_pre['treatment']:,.0f}",
        )
    console.print(table)


def cuped_reduction(report: Mapping[str, Any], metric: str | None = None) -> float | None:
    """The CUPED variance reduction in % of a metric (default: the primary one), None without pre-period data."""
    wanted = metric or report["primary_metric"]
    result = next(r for r in report["results"] if r["metric"] == wanted)
    cuped = result.get("cuped")
    return None if not cuped else cuped["variance_reduction_pct"]


def summary(result: AbResult) -> dict[str, Any]:
    """The headline numbers of a run (primary metric), e.g. for a report or a log line."""
    ctr = next(r for r in result.report["results"] if r["metric"] == result.report["primary_metric"])
    return {
        "experiment": result.key,
        "mode": result.mode,
        "visitors": {a["name"]: a["n"] for a in result.report["arms"]},
        "uplift": ctr["uplift"],
        "ci": [ctr["ci_lower"], ctr["ci_upper"]],
        "always_valid_ci": [ctr["always_valid"]["ci_lower"], ctr["always_valid"]["ci_upper"]],
        "p_value": ctr["p_value"],
        "srm_p_value": result.report["srm"]["p_value"],
        "verdict": result.report["verdict"]["decision"],
        "cuped_variance_reduction_pct": cuped_reduction(result.report),
        "models": result.arm_models,
        "requests": result.stats.requests,
        "events": result.stats.events,
    }
