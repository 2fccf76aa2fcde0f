"""`simulate-ab` end to end: the demo simulator's visitors use the live services (in-process apps on a fork of
the session's demo world, in a private Redis) for simulated days. Personalization must win an A/B test on
CTR with statistical significance; an A/A test must not find a difference."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from services.cli import app
from services.common.settings import CommonSettings
from services.demo.simulate_ab import AbResult, print_report, run_simulation, summary
from tests.conftest import RedisServer, SessionWorld, free_port, unique_name

DAYS = 6


@pytest.fixture(scope="module")
def results(world: SessionWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AbResult]]:
    directory = tmp_path_factory.mktemp("simulate-ab")
    redis_server = RedisServer(free_port(), directory / "redis")
    redis_server.directory.mkdir()
    redis_server.start()
    name = unique_name("sab")
    target = CommonSettings(
        data_dir=directory / "run", redis_url=redis_server.url, namespace=name, feast_project=name, environment="test"
    )
    try:
        yield run_simulation(world.settings, world.world.simulator, world.world.end, target, days=DAYS, mode="both")
    finally:
        redis_server.stop(kill=True)
        shutil.rmtree(directory, ignore_errors=True)


def ctr_of(result: AbResult) -> dict[str, Any]:
    return next(r for r in result.report["results"] if r["metric"] == "ctr")


@pytest.mark.slow
def test_personalized_arm_wins_on_ctr(results: list[AbResult]) -> None:
    ab = results[0]
    assert ab.mode == "ab" and ab.stats.days == DAYS and ab.stats.requests > 300
    print("A/B", summary(ab))  # the headline figures, visible with -s
    # The arms were served as configured: control generically, treatment by the model (a treatment visitor
    # without any history yet is served the popular-in-context list, which is correct).
    strategies = ab.stats.strategies
    assert {s for s in strategies if s.startswith("control:")} == {"control:generic_control"}, strategies
    treatment = {s: n for s, n in strategies.items() if s.startswith("treatment:")}
    assert treatment.get("treatment:personalized", 0) >= 0.95 * sum(treatment.values()), strategies
    arms = {arm["name"]: arm for arm in ab.report["arms"]}
    assert min(arms["control"]["n"], arms["treatment"]["n"]) > 60
    srm = ab.report["srm"]
    assert not srm["flagged"] and srm["p_value"] > 0.01
    ctr = ctr_of(ab)
    assert ctr["uplift"] > 0.1 and ctr["ci_lower"] > 0 and ctr["p_value"] < 0.05, ctr
    assert ctr["significant"] and ctr["chance_to_win"] > 0.95
    # The day-by-day cumulative uplift covers the run.
    assert len(ab.report["timeline"]) >= DAYS


@pytest.mark.slow
def test_aa_run_finds_no_difference(results: list[AbResult]) -> None:
    aa = results[1]
    assert aa.mode == "aa" and aa.stats.requests > 300
    print("A/A", summary(aa))
    assert set(aa.stats.strategies) == {"control:personalized", "treatment:personalized"}, aa.stats.strategies
    assert not aa.report["srm"]["flagged"]
    ctr = ctr_of(aa)
    assert ctr["ci_lower"] < 0 < ctr["ci_upper"] and ctr["p_value"] > 0.05, ctr
    assert not ctr["always_valid"]["significant"]
    assert aa.report["verdict"]["decision"] in ("keep_running", "no_detectable_difference")


@pytest.mark.slow
def test_report_prints_the_headline_numbers(results: list[AbResult]) -> None:
    console = Console(record=True, width=160)
    print_report(console, results[0].report)
    text = console.export_text()
    ctr = ctr_of(results[0])
    assert f"{ctr['uplift']:+.1%}" in text and "SRM: ok" in text and "verdict:" in text
    assert "control" in text and "generic" in text and "personalized" in text


def test_command_is_registered() -> None:
    result = CliRunner().invoke(app, ["simulate-ab", "--help"])
    assert result.exit_code == 0 and "--days" in result.output and "--mode" in result.output
    bad = CliRunner().invoke(app, ["simulate-ab", "--mode", "abc", "--data-dir", str(Path("/nonexistent"))])
    assert bad.exit_code != 0
