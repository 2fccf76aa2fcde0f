"""Prometheus carries what CUPED needs: from the exported counters alone (no store, no visitor ids in any label)
the adjusted uplift is recomputed exactly as the report computes it, and the result gauges show it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.experiments.config import ExperimentsFile
from services.experiments.runtime import ExperimentRuntime
from services.experiments.stats.cuped import CupedSums, RatioCupedSums, cuped_uplift
from services.experiments.store.base import OutcomeWrite
from services.experiments.store.sqlite_store import SqliteExperimentStore
from services.experiments.store.sums import count_increments
from tests.conftest import unique_name

START = 1_772_445_600.0  # 2026-03-02 10:00 UTC


def sample(name: str, key: str, arm: str, metric: str | None = None) -> float:
    labels = {"experiment": key, "arm": arm, "slot": "all", **({"metric": metric} if metric else {})}
    value = REGISTRY.get_sample_value(f"selaras_experiment_{name}", labels)
    assert value is not None, (name, labels)
    return value


def from_prometheus(key: str, arm: str, metric: str) -> CupedSums | RatioCupedSums:
    """The arm's CUPED sums as a PromQL user would read them (`…_total` counters, slot="all")."""

    def stat(name: str) -> float:
        return sample(f"{name}_total", key, arm, metric)

    n = sample("visitors_total", key, arm)
    with_pre = stat("covariate_visitors")
    if metric == "ctr":
        return RatioCupedSums(
            n=n,
            sum_m=stat("value_sum"),
            sum_m2=stat("value_squares_sum"),
            sum_d=stat("denominator_sum"),
            sum_d2=stat("denominator_squares_sum"),
            sum_md=stat("cross_sum"),
            sum_x=stat("covariate_sum"),
            sum_x2=stat("covariate_squares_sum"),
            sum_xm=stat("covariate_cross_sum"),
            sum_xd=stat("covariate_denominator_cross_sum"),
            n_new=n - with_pre,
            sum_m_new=stat("value_sum") - stat("value_sum_with_pre_period"),
            sum_d_new=stat("denominator_sum") - stat("denominator_sum_with_pre_period"),
        )
    return CupedSums(
        n=n,
        sum_y=stat("value_sum"),
        sum_y2=stat("value_squares_sum"),
        sum_x=stat("covariate_sum"),
        sum_x2=stat("covariate_squares_sum"),
        sum_xy=stat("covariate_cross_sum"),
        n_new=n - with_pre,
        sum_y_new=stat("value_sum") - stat("value_sum_with_pre_period"),
    )


def test_cuped_is_recomputed_from_the_prometheus_counters(tmp_path: Path) -> None:
    key = unique_name("prom-cuped").lower()[:40]
    config = ExperimentsFile.model_validate(
        {
            "experiments": [
                {
                    "key": key,
                    "enabled": True,
                    "slot_kinds": ["product"],
                    "arms": [
                        {"name": "control", "weight": 0.5, "personalized": False},
                        {"name": "treatment", "weight": 0.5, "personalized": True},
                    ],
                    "metrics": ["ctr", "conversion"],
                }
            ]
        }
    )
    runtime = ExperimentRuntime(config, SqliteExperimentStore(tmp_path / "prom.db"))
    rng = random.Random(5)
    for i in range(600):
        visitor = f"pv-{i}"
        chosen = runtime.assign_recommend(visitor, ["product"], START)
        assert chosen is not None
        habit = rng.random()
        covariates = {"conversion": 2 * habit, "ctr": habit / 5} if i % 4 else None  # a quarter are new
        shown = {"home": ("product", [f"p{j}" for j in range(rng.randint(2, 8))])}
        at = START + i
        runtime.record_exposure(visitor, key, chosen.arm, shown, None, f"rec-{i}", at, 0.001, covariates)
        writes = [
            OutcomeWrite(f"{key}@1", visitor, f"{visitor}-c{c}", at + 10, {"ctr": 1.0}, window_s=3600)
            for c in range(sum(rng.random() < 0.05 + 0.3 * habit for _ in range(3)))
        ]
        if rng.random() < 0.1 + 0.6 * habit:
            bought = OutcomeWrite(f"{key}@1", visitor, f"{visitor}-b", at + 20, {"conversion": 1.0}, window_s=3600)
            writes.append(bought)
        for applied in runtime.store.record_outcomes(writes):
            assert applied.status == "ok"
            count_increments(key, applied.arm, applied.increments)  # what the profile service's attribution does
    report = runtime.report(key, START + 1000)
    for metric in ("ctr", "conversion"):
        expected = next(r for r in report["results"] if r["metric"] == metric)["cuped"]
        assert expected is not None and expected["variance_reduction_pct"] > 5, metric
        recomputed = cuped_uplift(from_prometheus(key, "control", metric), from_prometheus(key, "treatment", metric))
        assert recomputed.adjusted.uplift == pytest.approx(expected["uplift"], rel=1e-9)
        assert recomputed.adjusted.ci_lower == pytest.approx(expected["ci_lower"], rel=1e-9)
        assert 100 * recomputed.variance_reduction == pytest.approx(expected["variance_reduction_pct"], rel=1e-9)
        # The result gauges show the same numbers.
        labels = {"experiment": key, "arm": "treatment", "metric": metric}
        uplift = REGISTRY.get_sample_value("selaras_experiment_cuped_uplift", labels)
        reduction = REGISTRY.get_sample_value("selaras_experiment_cuped_variance_reduction_ratio", labels)
        assert uplift == pytest.approx(expected["uplift"])
        assert reduction == pytest.approx(expected["variance_reduction_pct"] / 100)
