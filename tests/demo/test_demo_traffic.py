"""The traffic `selaras demo` sends through the shipped experiment: on a copy of the session's demo world, one
simulated day of visitors through both services enables `personalized-home`, fills both arms with exposures and
attributed clicks, and the recommend service started afterwards (with the shipped experiments.yaml, where the
experiment is off) serves that populated report, because the stored configuration wins over the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.settings import CommonSettings
from services.demo.commands import DEMO_EXPERIMENT, DemoTraffic, drive_demo_experiment, traffic_summary
from services.recommend.app import create_app
from services.recommend.settings import RecommendSettings
from tests.conftest import SessionWorld

SHIPPED = Path(__file__).resolve().parents[2] / "experiments.yaml"


@pytest.fixture(scope="module")
def driven(world: SessionWorld, world_fork: CommonSettings) -> tuple[CommonSettings, DemoTraffic]:
    return world_fork, drive_demo_experiment(world_fork, world.world.simulator, world.world.end, 1, SHIPPED)


def arms(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {arm["name"]: arm for arm in report["arms"]}


@pytest.mark.slow
def test_a_simulated_day_fills_both_arms(driven: tuple[CommonSettings, DemoTraffic]) -> None:
    _, traffic = driven
    assert traffic.days == 1 and traffic.requests == traffic.sessions > 100
    by_arm = arms(traffic.report)
    assert set(by_arm) == {"control", "treatment"}
    for arm in by_arm.values():
        assert arm["n"] > 20, by_arm
        assert arm["metrics"]["ctr"]["total"] > 0, "no click was attributed to the arm"
    line = traffic_summary(traffic)
    assert line.startswith(f"experiment {DEMO_EXPERIMENT}: 1 simulated days") and "control" in line, line


@pytest.mark.slow
def test_the_services_started_afterwards_serve_the_populated_report(
    driven: tuple[CommonSettings, DemoTraffic],
) -> None:
    fork, traffic = driven
    shared = fork.model_dump(include={"data_dir", "redis_url", "namespace", "feast_project", "environment"})
    with TestClient(create_app(RecommendSettings(**shared, experiments_file=SHIPPED))) as recommend:
        listed = recommend.get("/v1/experiments").json()["experiments"]
        served = recommend.get(f"/v1/experiments/{DEMO_EXPERIMENT}/report").json()
    assert [e["key"] for e in listed if e["enabled"]] == [DEMO_EXPERIMENT]
    assert {name: arm["n"] for name, arm in arms(served).items()} == {
        name: arm["n"] for name, arm in arms(traffic.report).items()
    }


@pytest.mark.slow
def test_the_demo_stores_its_personas_as_a_report(driven: tuple[CommonSettings, DemoTraffic]) -> None:
    from services.cli.serve import _personas_report
    from services.common.storage import open_store
    from services.profile.personas.repository import load_model
    from services.reports.store import ReportStore

    fork, _ = driven
    _personas_report(fork, fork.data_dir)
    store = open_store(fork)
    try:
        model, report = load_model(store), ReportStore(store).get("personas")
    finally:
        store.close()
    assert model is not None and report is not None and report.kind == "personas"
    assert f"{model.k} personas" in report.summary
    assert all(f'data-persona="{p.persona_id}"' in report.html for p in model.personas)
    assert (fork.data_dir / "reports" / "personas.html").read_text().startswith("<!doctype html>")
