"""`simulate-ab` end to end: the demo simulator's visitors use the live services (in-process apps on a fork of
the session's demo world, in a private Redis) for simulated days. Personalization must win an A/B test on
CTR with statistical significance; an A/A test must not find a difference. Model vs model: two ranker versions,
one per arm, after a pre-period outside any experiment; unknown versions and bad `--arms` are refused clearly."""

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
from services.demo.ab_report import print_report, summary
from services.demo.commands import LITE_RANKER
from services.demo.simulate_ab import (
    AbResult,
    ArmsError,
    fork_world,
    ranker_versions,
    run_simulation,
    train_ranker,
)
from services.recommend.training.train import TrainConfig
from tests.conftest import RedisServer, SessionWorld, free_port, unique_name

DAYS = 6
MODEL_DAYS, PRE_DAYS = 5, 2


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


@pytest.fixture(scope="module")
def model_run(world: SessionWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AbResult, str, str]]:
    """A model vs model run on a fork of the session world: its own model (v2) against a lite one (v1)."""
    directory = tmp_path_factory.mktemp("simulate-ab-models")
    redis_server = RedisServer(free_port(), directory / "redis")
    redis_server.directory.mkdir()
    redis_server.start()
    name = unique_name("sam")
    target = CommonSettings(
        data_dir=directory / "run", redis_url=redis_server.url, namespace=name, feast_project=name, environment="test"
    )
    simulator = world.world.simulator
    try:
        visitors, items = [v.visitor_id for v in simulator.visitors], [i.item_id for i in simulator.shop.products]
        fork_world(world.settings, target, visitors, items)
        full = ranker_versions(target)[-1]
        # Trained on the session world's log (read only), published to the fork's registry.
        lite, _ = train_ranker(world.settings, TrainConfig(seed=11, **LITE_RANKER), publish=target)
        [result] = run_simulation(
            world.settings,
            simulator,
            world.world.end,
            target,
            days=MODEL_DAYS,
            mode="models",
            models=(lite, full),
            pre_days=PRE_DAYS,
            forked=True,
        )
        yield result, lite, full
    finally:
        redis_server.stop(kill=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_model_vs_model_ranks_each_arm_by_its_version(model_run: tuple[AbResult, str, str]) -> None:
    result, lite, full = model_run
    print("models", summary(result))
    assert result.mode == "models" and result.stats.days == MODEL_DAYS
    assert result.arm_models == {"control": lite, "treatment": full}
    # Every answer of an arm was ranked by the arm's version (side by side in one process); "none" answers went
    # to the few visitors outside the experiment (no analytics consent).
    in_arms = {served for served in result.stats.models if not served.startswith("none:")}
    assert in_arms == {f"control:{lite}", f"treatment:{full}"}, result.stats.models
    arms = {arm["name"]: arm for arm in result.report["arms"]}
    assert min(arms["control"]["n"], arms["treatment"]["n"]) > 40 and not result.report["srm"]["flagged"]
    # The pre-period served the same visitors outside any experiment, before it started.
    pre = result.pre_period
    assert pre is not None and pre.days == PRE_DAYS and pre.requests > 100
    assert {served.split(":")[0] for served in pre.strategies} == {"none"}
    console = Console(record=True, width=180)
    print_report(console, result.report, arm_models=result.arm_models)
    text = console.export_text()
    assert f"model {lite}" in text and f"model {full}" in text and "CUPED" in text
    # One CUPED row per result: adjusted when serving passed covariates, "no pre-period data" otherwise.
    assert all("cuped" in r for r in result.report["results"])


def test_an_unknown_version_is_refused_naming_the_available_ones(world: SessionWorld, tmp_path: Path) -> None:
    versions = ranker_versions(world.settings)
    target = CommonSettings(data_dir=tmp_path, namespace=unique_name("x"), environment="test")
    with pytest.raises(ArmsError, match="unknown ranker version 'nope'") as raised:
        run_simulation(
            world.settings, world.world.simulator, world.world.end, target, mode="models", models=("nope", versions[0])
        )
    assert all(version in str(raised.value) for version in versions)
    assert not (tmp_path / "simulate-ab-experiments.yaml").exists()  # refused before anything was forked


@pytest.mark.parametrize(
    ("arms", "extra", "message"),
    [
        ("v1,v2", [], "model:<v1>,model:<v2>"),
        ("model:v1", [], "model:<v1>,model:<v2>"),
        ("model:v1,model:v1", [], "both arms name"),
        ("model:v1,model:v2", ["--mode", "ab"], "leave --mode out"),
    ],
)
def test_bad_arms_are_refused_without_a_traceback(arms: str, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["simulate-ab", "--arms", arms, *extra, "--data-dir", "/nonexistent"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (Path("/nonexistent").exists())
