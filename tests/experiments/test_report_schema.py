"""The report's typed shape: real reports (every block: CUPED, capped revenue, holdout, breakdowns, timeline)
validate against services/experiments/schemas.py, which forbids unknown fields, and the OpenAPI document of the
recommend service describes the report route with it."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.auth import hash_key
from services.experiments.config import ExperimentsFile
from services.experiments.runtime import ExperimentRuntime
from services.experiments.schemas import ExperimentReport
from services.experiments.store.base import ExposureWrite, OutcomeWrite
from services.experiments.store.sqlite_store import SqliteExperimentStore
from services.recommend.app import create_app
from services.recommend.settings import RecommendSettings

START = 1_772_445_600.0  # 2026-03-02 10:00 UTC
DAY = 86_400.0


def populated_runtime(tmp_path: Path) -> ExperimentRuntime:
    """Three days of a model-vs-model test whose visitors have a pre-period that predicts their outcomes."""
    config = ExperimentsFile.model_validate(
        {
            "holdout": 0.05,
            "experiments": [
                {
                    "key": "models",
                    "enabled": True,
                    "slot_kinds": ["product"],
                    "slots": ["home"],
                    "arms": [
                        {"name": "control", "weight": 0.5, "personalized": True, "model": "v1"},
                        {"name": "treatment", "weight": 0.5, "personalized": True, "model": "v2"},
                    ],
                    "metrics": ["ctr", "conversion", "revenue"],
                    "primary_metric": "conversion",
                    "min_visitors_per_arm": 50,
                }
            ],
        }
    )
    runtime = ExperimentRuntime(config, SqliteExperimentStore(tmp_path / "report.db"))
    rng = random.Random(11)
    for i in range(900):
        visitor = f"rv-{i}"
        chosen = runtime.assign_recommend(visitor, ["product"], START)
        assert chosen is not None
        at = START + (i % 3) * DAY + rng.uniform(0, DAY / 2)
        habit = rng.random()  # the visitor's propensity, seen in the pre-period and in the outcome
        known = rng.random() < 0.7
        covariates = {"conversion": habit, "ctr": habit / 4, "revenue": 10 * habit} if known else None
        shown = {"all": {"ctr": 6.0}, "slot:home": {"ctr": 6.0}}
        runtime.store.record_exposure(
            ExposureWrite("models@1", visitor, chosen.arm, ("hemat", "sultan")[i % 2], at, shown, covariates=covariates)
        )
        values: dict[str, float] = {}
        if rng.random() < 0.05 + 0.8 * habit:
            values = {"conversion": 1.0, "revenue": rng.lognormvariate(11 + habit, 1.0)}
        clicks = sum(rng.random() < 0.05 + 0.2 * habit for _ in range(6))
        writes = [
            OutcomeWrite("models@1", visitor, f"{visitor}-c{c}", at + 60, {"ctr": 1.0}, "slot:home", window_s=3600)
            for c in range(clicks)
        ]
        if values:
            writes.append(OutcomeWrite("models@1", visitor, f"{visitor}-p", at + 120, values, window_s=3600))
        runtime.store.record_outcomes(writes)
    return runtime


def test_a_full_report_validates_against_the_schema(tmp_path: Path) -> None:
    runtime = populated_runtime(tmp_path)
    report = runtime.report("models", START + 3 * DAY)
    typed = ExperimentReport.model_validate(report)  # extra="forbid": an unknown field fails here
    assert typed.holdout is not None and typed.holdout.n > 0
    assert [arm.model for arm in typed.arms] == ["v1", "v2"]
    assert {row.group for row in typed.breakdowns.slot} == {"home"}
    assert {row.group for row in typed.breakdowns.persona} == {"hemat", "sultan"}
    assert len(typed.timeline) == 3
    by_metric = {result.metric: result for result in typed.results}
    assert by_metric["revenue"].capped_at is not None and by_metric["revenue"].uncapped is not None
    for metric in ("ctr", "conversion", "revenue"):
        cuped = by_metric[metric].cuped
        assert cuped is not None and cuped.visitors_with_pre_period.control > 0, metric
    conversion = by_metric["conversion"].cuped
    assert conversion is not None and conversion.variance_reduction_pct is not None
    assert conversion.variance_reduction_pct > 5  # the pre-period predicts conversion here
    # The model's dump is the report (nothing dropped or renamed on the way).
    assert typed.model_dump(mode="json", exclude_unset=True) == report


def test_the_openapi_document_describes_the_report(settings_factory: Callable[..., Any]) -> None:
    keys = f"ops:admin:{hash_key('ops-key-0002')}"
    app = create_app(settings_factory(RecommendSettings, redis_url=None, api_keys=keys))
    document = app.openapi()
    operation = document["paths"]["/v1/experiments/{key}/report"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ExperimentReport"}
    components = document["components"]["schemas"]
    assert {"arms", "results", "srm", "verdict", "timeline"} <= set(components["ExperimentReport"]["properties"])
    assert "variance_reduction_pct" in components["CupedComparison"]["properties"]
    assert "404" in operation["responses"]
