"""Experiments end to end on real Redis: configuration, sticky assignment, tagged answers, attribution of
outcomes through the profile service (exactly once), the admin API and the report."""

from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.common.auth import hash_key
from services.common.storage import Namespace, open_store
from services.experiments.assignment import growthbook_hash
from services.experiments.config import ArmChoice, ExperimentConfigError, ExperimentsFile, load_config
from services.experiments.report import build_report
from services.experiments.runtime import ExperimentRuntime
from services.experiments.stats.capping import covariate_histogram_from_values, histogram_cap, histogram_from_values
from services.experiments.stats.cuped import CupedSums, cuped_uplift
from services.experiments.stats.intervals import ArmSums, relative_uplift
from services.experiments.stats.multiplicity import holm
from services.experiments.stats.sequential import always_valid_interval
from services.experiments.stats.srm import srm_check
from services.experiments.store import open_experiment_store
from services.experiments.store.base import ExposureWrite
from services.experiments.store.sqlite_store import SqliteExperimentStore
from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings
from tests.conftest import RedisServer, free_port, unique_name
from tests.factories import make_item

ADMIN, READER = "admin-secret-key-1", "reader-secret-key-1"
EXPERIMENTS_YAML = """
holdout: 0.1
experiments:
  - key: home-test
    description: personalized vs generic home
    enabled: true
    slot_kinds: [product, banner]
    slots: [home]
    arms:
      - {name: control, weight: 0.5, personalized: false}
      - {name: treatment, weight: 0.5, personalized: true}
    attribution_window_hours: 2
    min_visitors_per_arm: 5
  - key: push-test
    enabled: true
    channels: [push]
    arms:
      - {name: control, weight: 0.5, personalized: false}
      - {name: treatment, weight: 0.5, personalized: true}
  - key: srm-test
    enabled: true
    slot_kinds: [cta]
    start: 2020-01-01T00:00:00+07:00
    end: 2020-02-01T00:00:00+07:00
    arms:
      - {name: control, weight: 0.5, personalized: false}
      - {name: treatment, weight: 0.5, personalized: true}
    min_visitors_per_arm: 10
  - key: parked
    slot_kinds: [product]
    arms:
      - {name: control, weight: 0.5, personalized: false}
      - {name: treatment, weight: 0.5, personalized: true}
"""
CONTROL = {"name": "control", "weight": 0.5, "personalized": False}
TREATMENT = {"name": "treatment", "weight": 0.5, "personalized": True}
SLOTS = [{"name": "home", "kind": "product", "count": 5}, {"name": "side", "kind": "product", "count": 3}]


@dataclass
class Services:
    profile: TestClient
    recommend: TestClient
    settings: RecommendSettings

    def admin(self, path: str) -> Any:
        response = self.recommend.get(path, headers={"X-API-Key": ADMIN})
        assert response.status_code == 200, response.text
        return response.json()

    def recommend_for(
        self, visitor: str, slots: list[dict[str, Any]] | None = None, now: datetime | None = None
    ) -> dict[str, Any]:
        """As the browser would ask; with `now`, as an admin replaying an earlier moment (only admins may)."""
        context: dict[str, Any] = {"device": "mobile", "city": "Jakarta"}
        if now is not None:
            context["now"] = now.isoformat()
        response = self.recommend.post(
            "/v1/recommend",
            json={"visitor_id": visitor, "slots": slots or SLOTS, "context": context},
            headers={"X-API-Key": READER if now is None else ADMIN},
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def send(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        response = self.profile.post("/v1/events", json={"events": events}, headers={"X-API-Key": ADMIN})
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_report(self, key: str, done: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            report: dict[str, Any] = self.admin(f"/v1/experiments/{key}/report")
            if done(report) or time.monotonic() > deadline:
                return report
            time.sleep(0.1)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    directory = tmp_path_factory.mktemp("experiments")
    (directory / "experiments.yaml").write_text(EXPERIMENTS_YAML)
    namespace = unique_name("ex")
    # A private Redis: the services scan their namespaces, which is slow on a Redis shared with big test worlds.
    redis_server = RedisServer(free_port(), directory / "redis")
    redis_server.directory.mkdir()
    redis_server.start()
    keys = f"admin:admin:{hash_key(ADMIN)},reader:recommend:{hash_key(READER)}"
    common: dict[str, Any] = {
        "data_dir": directory / "data",
        "redis_url": redis_server.url,
        "namespace": namespace,
        "feast_project": namespace,
        "environment": "test",
        "api_keys": keys,
    }
    recommend_settings = RecommendSettings(
        **common, experiments_file=directory / "experiments.yaml", refresh_interval_s=0.3
    )
    profile_settings = ProfileSettings(**common, aggregator_idle_s=0.01)
    with (
        TestClient(create_profile_app(profile_settings)) as profile,
        TestClient(create_recommend_app(recommend_settings)) as recommend,
    ):
        items = [make_item(item_id=f"p{i:03d}", category=f"cat-{i % 6}").model_dump(mode="json") for i in range(60)]
        assert (
            recommend.put("/v1/catalog/items", json={"items": items}, headers={"X-API-Key": ADMIN}).status_code == 200
        )
        assert recommend.post("/v1/admin/reload", headers={"X-API-Key": ADMIN}).status_code == 200
        yield Services(profile, recommend, recommend_settings)
    redis_server.stop(kill=True)
    shutil.rmtree(directory, ignore_errors=True)


def event(visitor: str, kind: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": f"{kind}-{visitor}-{unique_name('')}",
        "visitor_id": visitor,
        "type": kind,
        "timestamp": at.isoformat(),
        **fields,
    }


# -- configuration -------------------------------------------------------------------------------------


def test_shipped_experiments_file_is_valid_and_off() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "experiments.yaml")
    assert config.experiments, "ship one example experiment"
    assert all(not e.enabled for e in config.experiments)
    example = config.experiments[0]
    assert {arm.name: arm.personalized for arm in example.arms} == {"control": False, "treatment": True}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"arms": [{**CONTROL, "weight": 0.7}, {**TREATMENT, "weight": 0.7}]}, "sum to 1"),
        ({"control": "baseline"}, "control arm 'baseline'"),
        ({"slot_kinds": [], "channels": []}, "at least one slot kind"),
        ({"slot_kinds": ["message"]}, "experiments.0.slot_kinds.0"),
        ({"key": "Bad Key"}, "experiments.0.key"),
        ({"arms": [CONTROL, {**TREATMENT, "name": "holdout"}]}, "reserved"),
        ({"start": "2026-02-01T00:00:00+07:00", "end": "2026-01-01T00:00:00+07:00"}, "end must be after start"),
        ({"weight_typo": 1}, "experiments.0.weight_typo"),
    ],
)  # fmt: skip
def test_invalid_experiments_are_refused_with_the_field(tmp_path: Path, patch: dict[str, Any], message: str) -> None:
    import yaml

    experiment: dict[str, Any] = {
        "key": "k",
        "slot_kinds": ["product"],
        "arms": [
            {"name": "control", "weight": 0.5, "personalized": False},
            {"name": "treatment", "weight": 0.5, "personalized": True},
        ],
    }
    experiment.update(patch)
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump({"experiments": [experiment]}))
    with pytest.raises(ExperimentConfigError, match=message):
        load_config(path)


def test_duplicate_keys_are_refused() -> None:
    arms = [
        {"name": "control", "weight": 0.5, "personalized": False},
        {"name": "t", "weight": 0.5, "personalized": True},
    ]
    spec = {"key": "k", "slot_kinds": ["product"], "arms": arms}
    with pytest.raises(ValueError, match="unique"):
        ExperimentsFile.model_validate({"experiments": [spec, spec]})


# -- assignment -------------------------------------------------------------------------------------------


def runtime_for(tmp_path: Path, experiments: list[dict[str, Any]], holdout: float = 0.0) -> ExperimentRuntime:
    config = ExperimentsFile.model_validate({"holdout": holdout, "experiments": experiments})
    return ExperimentRuntime(config, SqliteExperimentStore(tmp_path / f"{unique_name('rt')}.db"))


def two_arms(weights: tuple[float, float] = (0.5, 0.5), **extra: Any) -> dict[str, Any]:
    return {
        "key": "exp",
        "enabled": True,
        "slot_kinds": ["product"],
        "arms": [
            {"name": "control", "weight": weights[0], "personalized": False},
            {"name": "treatment", "weight": weights[1], "personalized": True},
        ],
        **extra,
    }


def test_assignment_is_sticky_balanced_and_holds_out(tmp_path: Path) -> None:
    now = time.time()
    runtime = runtime_for(tmp_path, [two_arms()], holdout=0.05)
    visitors = [f"visitor-{i}" for i in range(20_000)]
    arms = [runtime.assign_recommend(v, ["product"], now) for v in visitors]
    assert all(a is not None for a in arms)
    counts = Counter(a[1] for a in arms if a)
    assert 0.04 < counts["holdout"] / len(visitors) < 0.06
    _, p_value, flagged = srm_check([counts["control"], counts["treatment"]], [0.5, 0.5])
    assert not flagged and p_value > 0.001, counts
    assert all(a[2] is (a[1] == "treatment") for a in arms if a)  # holdout and control are never personalized
    # Sticky: a second process (runtime) assigns every visitor to the same arm.
    again = runtime_for(tmp_path, [two_arms()], holdout=0.05)
    assert [again.assign_recommend(v, ["product"], now) for v in visitors[:2000]] == arms[:2000]
    # A new bucket version re-randomizes: about half of the visitors change arm.
    bumped = runtime_for(tmp_path, [two_arms(bucket_version=2)], holdout=0.05)
    moved = sum(
        bumped.assign_recommend(v, ["product"], now) != a for v, a in zip(visitors[:2000], arms[:2000], strict=True)
    )
    assert 800 < moved < 1200


def test_assignment_follows_the_growthbook_hash_and_coverage(tmp_path: Path) -> None:
    # Published vector: hash("seed", "a", v2) = 0.0505; it falls just past a 5% control range.
    assert growthbook_hash("seed", "a", 2) == 0.0505
    now = time.time()
    assert runtime_for(tmp_path, [two_arms((0.05, 0.95), seed="seed")]).assign_recommend(
        "a", ["product"], now
    ) == ArmChoice("exp", "treatment", True)
    assert runtime_for(tmp_path, [two_arms((0.06, 0.94), seed="seed")]).assign_recommend(
        "a", ["product"], now
    ) == ArmChoice("exp", "control", False)
    half = runtime_for(tmp_path, [two_arms(coverage=0.5)])
    full = runtime_for(tmp_path, [two_arms(coverage=1.0)])
    visitors = [f"c{i}" for i in range(4000)]
    enrolled = [v for v in visitors if half.assign_recommend(v, ["product"], now)]
    assert 0.45 < len(enrolled) / len(visitors) < 0.55
    # Raising coverage keeps everybody who was enrolled in the same arm.
    assert all(
        half.assign_recommend(v, ["product"], now) == full.assign_recommend(v, ["product"], now) for v in enrolled
    )


def test_assignment_respects_surfaces_and_schedule(tmp_path: Path) -> None:
    start, end = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 8, tzinfo=UTC)
    runtime = runtime_for(
        tmp_path,
        [
            two_arms(start=start.isoformat(), end=end.isoformat(), channels=["push"]),
            {**two_arms(), "key": "disabled", "enabled": False},
        ],
    )
    inside = (start + timedelta(days=1)).timestamp()
    assert runtime.assign_recommend("v1", ["banner"], inside) is None
    assert runtime.assign_recommend("v1", ["banner", "product"], inside) is not None
    assert runtime.assign_recommend("v1", ["product"], start.timestamp() - 1) is None
    assert runtime.assign_recommend("v1", ["product"], end.timestamp()) is None
    assert runtime.assign_message("v1", "push", inside) is not None
    assert runtime.assign_message("v1", "email", inside) is None
    assert [e["key"] for e in runtime.store.registry().values()] == ["exp"]


# -- through the services ---------------------------------------------------------------------------------


def test_answers_say_which_experiment_and_arm_served_them(services: Services) -> None:
    seen: Counter[str] = Counter()
    for i in range(60):
        body = services.recommend_for(f"tag-{i}")
        experiment = body["experiment"]
        assert experiment["key"] == "home-test"
        seen[experiment["arm"]] += 1
        expected = {"control": "generic_control", "holdout": "generic_control", "treatment": "popular_in_context"}
        assert body["strategy"] == expected[experiment["arm"]]  # unknown visitors: the model has nothing to use
        # Same visitor, same arm.
        assert services.recommend_for(f"tag-{i}")["experiment"] == experiment
    assert seen["control"] > 10 and seen["treatment"] > 10
    # A request with only uncovered slot kinds (cta) is in no running experiment.
    assert services.recommend_for("tag-0", [{"name": "cta", "kind": "cta", "count": 1}])["experiment"] is None


def test_no_exposure_is_tracked_without_analytics_consent(services: Services) -> None:
    before = services.admin("/v1/experiments/home-test/report")
    refused = services.profile.put(
        "/v1/profiles/no-stats/consent", json={"analytics": False}, headers={"X-API-Key": ADMIN}
    )
    assert refused.json()["consent"]["analytics"] is False
    for _ in range(3):
        body = services.recommend_for("no-stats")
        assert body["experiment"] is None and body["slots"][0]["items"]  # served, outside the experiment
    after = services.admin("/v1/experiments/home-test/report")
    assert [a["n"] for a in after["arms"]] == [a["n"] for a in before["arms"]]  # nobody was counted in an arm
    assert services.recommend_for("stats-ok")["experiment"] is not None  # the default (opt-out) allows it


def test_no_outcome_is_attributed_after_analytics_is_withdrawn(services: Services) -> None:
    now = datetime.now(UTC) - timedelta(hours=6)
    shown: dict[str, dict[str, Any]] = {}
    for i in range(40):  # one visitor who withdraws and one who does not, both in an arm that counts clicks
        body = services.recommend_for(f"late-{i}", now=now)
        if body["experiment"]["arm"] != "holdout":
            shown[f"late-{i}"] = body
        if len(shown) == 2:
            break
    withdrawing = next(iter(shown))  # the other one keeps analytics: its click is the control
    put = services.profile.put(
        f"/v1/profiles/{withdrawing}/consent", json={"analytics": False}, headers={"X-API-Key": ADMIN}
    )
    assert put.status_code == 200

    def clicks(report: dict[str, Any]) -> float:
        return sum(a["metrics"]["ctr"]["total"] for a in report["arms"])

    before = clicks(services.admin("/v1/experiments/home-test/report"))
    events = [
        event(
            v,
            "click",
            now,
            item_id=body["slots"][0]["items"][0]["item_id"],
            recommendation_id=body["recommendation_id"],
        )
        for v, body in shown.items()
    ]
    services.send(events)
    report = services.wait_report("home-test", lambda r: clicks(r) >= before + 1)
    time.sleep(0.5)  # the aggregator folds both events in one batch; give a wrong second count time to show
    assert clicks(services.admin("/v1/experiments/home-test/report")) == clicks(report) == before + 1


def test_outcomes_are_attributed_to_arm_and_slot_exactly_once(services: Services) -> None:
    before = services.admin("/v1/experiments/home-test/report")
    # Shown six hours ago (an admin may set the time), so that every outcome below is in the past: the
    # service refuses events from the future.
    now = datetime.now(UTC) - timedelta(hours=6)
    events: list[dict[str, Any]] = []
    expected = {"control": Counter[str](), "treatment": Counter[str]()}
    visitors = [f"attr-{i}" for i in range(30)]
    for visitor in visitors:
        body = services.recommend_for(visitor, now=now)
        arm = body["experiment"]["arm"]
        if arm == "holdout":
            continue
        home, side = body["slots"]
        rec = body["recommendation_id"]
        events.append(event(visitor, "click", now, item_id=home["items"][0]["item_id"], recommendation_id=rec))
        events.append(event(visitor, "click", now, item_id=side["items"][1]["item_id"], recommendation_id=rec))
        price = 120_000.0
        # A purchase without the id, within the 2 h window: counts for conversion and revenue.
        events.append(event(visitor, "purchase", now + timedelta(minutes=30), item_id="p001", price=price, quantity=2))
        # One outside the window does not.
        events.append(event(visitor, "purchase", now + timedelta(hours=5), item_id="p002", price=price))
        # Somebody else echoing the id (a shared link) is not this visitor's outcome.
        events.append(event("stranger", "click", now, item_id=home["items"][0]["item_id"], recommendation_id=rec))
        expected[arm].update(clicks=2, home_clicks=1, buyers=1, revenue=2 * price)
    assert services.send(events)["accepted"] == len(events)

    def totals(report: dict[str, Any], arm: str) -> tuple[float, float, float]:
        metrics = next(a for a in report["arms"] if a["name"] == arm)["metrics"]
        return metrics["ctr"]["total"], metrics["conversion"]["total"], metrics["revenue"]["total"]

    def wanted(arm: str) -> tuple[float, float, float]:
        base = totals(before, arm)
        return (
            base[0] + expected[arm]["clicks"],
            base[1] + expected[arm]["buyers"],
            base[2] + expected[arm]["revenue"],
        )

    report = services.wait_report(
        "home-test", lambda r: all(totals(r, arm) == wanted(arm) for arm in ("control", "treatment"))
    )
    for arm in ("control", "treatment"):
        assert totals(report, arm) == wanted(arm)
    home = next(row for row in report["breakdowns"]["slot"] if row["group"] == "home")
    other = next(row for row in report["breakdowns"]["slot"] if row["group"] == "other")  # "side" is not configured
    before_home = {r["group"]: r for r in before["breakdowns"]["slot"]}.get("home")
    for arm in ("control", "treatment"):
        base = before_home["arms"][arm]["metrics"]["ctr"]["total"] if before_home else 0.0
        assert home["arms"][arm]["metrics"]["ctr"]["total"] == base + expected[arm]["home_clicks"]
        assert other["arms"][arm]["n"] > 0

    # Re-sending the same events and replaying the whole log (at-least-once delivery) change nothing.
    assert services.send(events)["duplicates"] == len(events)
    store = open_store(services.settings)
    try:
        store.put(Namespace.CURSOR, "aggregator", b"0-0")
        time.sleep(1.5)
    finally:
        store.close()
    replayed = services.admin("/v1/experiments/home-test/report")
    for arm in ("control", "treatment"):
        assert totals(replayed, arm) == wanted(arm)
    assert replayed["arms"] == report["arms"]


def test_message_exposures_and_their_outcomes(services: Services) -> None:
    runtime = services.recommend.app.state.recommend.service.experiments  # type: ignore[attr-defined]
    now = datetime.now(UTC)
    opened = 0
    events = []
    for i in range(20):
        visitor = f"msg-{i}"
        chosen = runtime.assign_message(visitor, "push", now.timestamp())
        assert chosen is not None and chosen[0] == "push-test"
        if chosen[1] == "holdout":
            continue
        rec = f"msg-rec-{i}-{unique_name('')}"
        runtime.record_message_exposure(visitor, chosen[0], chosen[1], "push", rec, now.timestamp(), item_id="m1")
        if i % 2 == 0:
            opened += 1
            events.append(
                event(visitor, "message_open", now + timedelta(minutes=1), item_id="m1", recommendation_id=rec)
            )
            events.append(
                event(visitor, "message_click", now + timedelta(minutes=2), item_id="m1", recommendation_id=rec)
            )
    services.send(events)
    report = services.wait_report(
        "push-test", lambda r: sum(a["metrics"]["open_rate"]["total"] for a in r["arms"]) == opened
    )
    assert sum(a["metrics"]["open_rate"]["total"] for a in report["arms"]) == opened
    assert sum(a["metrics"]["ctr"]["total"] for a in report["arms"]) == opened
    assert {row["group"] for row in report["breakdowns"]["slot"]} == {"push"}
    assert sum(a["metrics"]["open_rate"]["denominator"] for a in report["arms"]) == sum(a["n"] for a in report["arms"])


def _covariate_sample(name: str, arm: str, metric: str) -> float:
    labels = {"experiment": "home-test", "arm": arm, "metric": metric, "slot": "all"}
    return REGISTRY.get_sample_value(f"selaras_experiment_{name}_total", labels) or 0.0


def test_a_known_visitor_brings_a_pre_period_to_cuped(services: Services) -> None:
    """Serving passes the visitor's point-in-time features as CUPED covariates at the first exposure (frozen):
    the store counts the visitor as one with a pre-period and Prometheus gets the additive covariate sums."""
    now = datetime.now(UTC) - timedelta(hours=3)
    visitor = next(v for v in (f"cuped-{i}" for i in range(100)) if growthbook_hash("selaras-holdout", v, 2) >= 0.1)
    services.send(
        [
            event(visitor, "product_view", now, item_id="p001"),
            event(visitor, "purchase", now + timedelta(minutes=1), item_id="p002", price=50_000.0, quantity=2),
        ]
    )
    service = services.recommend.app.state.recommend.service  # type: ignore[attr-defined]
    deadline = time.monotonic() + 15
    while service.read_visitor(visitor).row is None and time.monotonic() < deadline:
        time.sleep(0.1)
    row = service.read_visitor(visitor).row
    assert row is not None and row["purchases_30d"] == 1, row
    names = ("covariate_sum", "covariate_visitors")
    before = {(n, a, m): _covariate_sample(n, a, m) for n in names for a in ("control", "treatment")
              for m in ("conversion", "revenue", "ctr")}  # fmt: skip
    report_before = services.admin("/v1/experiments/home-test/report")
    arm = services.recommend_for(visitor)["experiment"]["arm"]
    assert arm in ("control", "treatment")
    services.recommend_for(visitor)  # a second exposure adds nothing: the covariate is frozen at the first

    def delta(name: str, metric: str) -> float:
        return _covariate_sample(name, arm, metric) - before[(name, arm, metric)]

    assert delta("covariate_visitors", "conversion") == 1 and delta("covariate_sum", "conversion") == 1
    assert delta("covariate_visitors", "revenue") == 1 and delta("covariate_sum", "revenue") == pytest.approx(
        math.log1p(row["rfm_monetary"])
    )
    assert delta("covariate_visitors", "ctr") == 0  # no recommendation seen before: no pre-period for CTR

    def with_pre(report: dict[str, Any]) -> float:
        result = next(r for r in report["results"] if r["metric"] == "conversion")
        cuped = result["cuped"]
        return cuped["visitors_with_pre_period"]["control" if arm == "control" else "treatment"] if cuped else 0.0

    assert with_pre(services.admin("/v1/experiments/home-test/report")) == with_pre(report_before) + 1


def test_srm_is_flagged_in_the_report_and_the_gauges(services: Services) -> None:
    store = open_experiment_store(services.settings)
    try:
        for i in range(300):
            arm = "control" if i % 4 else "treatment"  # 75/25 instead of the configured 50/50
            store.record_exposure(
                ExposureWrite("srm-test@1", f"srm-{i}", arm, "unknown", time.time(), {"all": {"ctr": 3}})
            )
    finally:
        store.close()
    report = services.admin("/v1/experiments/srm-test/report")
    assert report["status"] == "ended"
    assert report["srm"]["flagged"] and report["srm"]["p_value"] < 1e-10
    assert report["srm"]["observed"] == {"control": 225.0, "treatment": 75.0}
    assert report["verdict"] == {**report["verdict"], "ready": False, "decision": "investigate_srm"}
    assert REGISTRY.get_sample_value("selaras_experiment_srm_flagged", {"experiment": "srm-test"}) == 1.0
    assert REGISTRY.get_sample_value("selaras_experiment_srm_p_value", {"experiment": "srm-test"}) < 1e-10


def test_admin_api_and_page(services: Services) -> None:
    client = services.recommend
    listed = services.admin("/v1/experiments")
    assert [e["key"] for e in listed["experiments"]] == ["home-test", "push-test", "srm-test", "parked"]
    assert [e["status"] for e in listed["experiments"]] == ["running", "running", "ended", "disabled"]
    assert listed["holdout"] == 0.1
    one = services.admin("/v1/experiments/home-test")
    assert one["arms"][0] == {
        "name": "control",
        "weight": 0.5,
        "personalized": False,
        "model": None,
        "candidate_sources": None,
        "max_per_category": None,
        "description": "",
    }
    assert client.get("/v1/experiments").status_code == 401
    assert client.get("/v1/experiments/home-test/report", headers={"X-API-Key": READER}).status_code == 403
    missing = client.get("/v1/experiments/nope/report", headers={"X-API-Key": ADMIN})
    assert missing.status_code == 404 and missing.json()["error"] == "NotFound"
    # Changes are PATCHes of single fields (tests/experiments/test_admin_api.py); nothing replaces a whole one.
    assert client.put("/v1/experiments/home-test", json={}, headers={"X-API-Key": ADMIN}).status_code == 405
    page = client.get("/experiments")
    assert page.status_code == 200 and "experiments.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/experiments/assets/experiments.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/experiments/assets/..%2Fexperiments.py").status_code == 404


# -- the report (pure) ------------------------------------------------------------------------------------


def test_report_numbers_are_the_stats_module_on_the_stored_sums() -> None:
    config = ExperimentsFile.model_validate({"experiments": [two_arms(min_visitors_per_arm=50, planned_visitors=400)]})
    experiment = config.experiments[0]
    control = ArmSums.from_values([1, 0, 2, 0, 1] * 40, [10, 8, 12, 9, 10] * 40)
    treatment = ArmSums.from_values([2, 1, 2, 0, 3] * 40, [10, 9, 11, 9, 10] * 40)

    def group(sums: ArmSums) -> dict[str, Any]:
        stats = {"x": sums.sum_x, "x2": sums.sum_x2, "y": sums.sum_y, "y2": sums.sum_y2, "xy": sums.sum_xy}
        return {"n": sums.n, "ctr": stats}

    tree = {"control": {"all": group(control)}, "treatment": {"all": group(treatment)}}
    days = {"2026-03-01": {"control": group(control), "treatment": group(treatment)}}
    report = build_report(experiment, tree, days, time.time())
    ctr = next(r for r in report["results"] if r["metric"] == "ctr")
    fixed = relative_uplift(control, treatment, ratio=True)
    valid = always_valid_interval(control, treatment, ratio=True, planned_n=400)
    assert (ctr["uplift"], ctr["ci_lower"], ctr["ci_upper"], ctr["p_value"]) == (
        fixed.uplift,
        fixed.ci_lower,
        fixed.ci_upper,
        fixed.p_value,
    )
    assert (ctr["always_valid"]["ci_lower"], ctr["always_valid"]["ci_upper"]) == (valid.ci_lower, valid.ci_upper)
    p_values = [r["p_value"] if r["p_value"] is not None else float("nan") for r in report["results"]]
    assert ctr["p_value_holm"] == pytest.approx(float(holm(p_values)[0][0]))
    assert report["timeline"][-1]["arms"]["treatment"]["uplift"] == fixed.uplift
    assert report["verdict"]["decision"] == "ship_treatment" and report["verdict"]["ready"]
    assert report["verdict"]["reasons"][0]["code"] == "winner"
    # Below the minimum sample, the same uplift is not a decision yet.
    small = ExperimentsFile.model_validate({"experiments": [two_arms(min_visitors_per_arm=1000)]}).experiments[0]
    assert build_report(small, tree, days, time.time())["verdict"]["decision"] == "keep_running"


def _conversion_tree(control: tuple[int, int], treatment: tuple[int, int]) -> dict[str, Any]:
    def group(n: int, buyers: int) -> dict[str, Any]:
        return {"n": float(n), "conversion": {"x": float(buyers), "x2": float(buyers)}}

    return {"control": {"all": group(*control)}, "treatment": {"all": group(*treatment)}}


def test_verdict_cannot_contradict_the_data() -> None:
    # Issue 18's replay: 8 of 2,021 vs 39 of 1,979 (p = 3.4e-5) once ended "no_detectable_difference".
    settings: dict[str, Any] = {"primary_metric": "conversion", "metrics": ["conversion"], "planned_visitors": 4000}
    experiment = ExperimentsFile.model_validate({"experiments": [two_arms(**settings)]}).experiments[0]
    report = build_report(experiment, _conversion_tree((2021, 8), (1979, 39)), {}, time.time())
    result = report["results"][0]
    assert result["p_value"] < 1e-4 and result["always_valid"]["method"] == "log_ratio"
    assert result["always_valid"]["ci_lower"] > 0.0 and result["always_valid"]["significant"]
    assert report["verdict"]["decision"] == "ship_treatment" and report["verdict"]["ready"]
    # A difference the fixed-horizon test sees but the peeking-safe interval does not confirm yet is
    # "keep running", never "no detectable difference", even with the planned sample reached.
    report = build_report(experiment, _conversion_tree((2000, 100), (2000, 135)), {}, time.time())
    result = report["results"][0]
    assert result["significant"] and not result["always_valid"]["significant"]
    assert report["verdict"]["decision"] == "keep_running" and not report["verdict"]["ready"]
    assert report["verdict"]["reasons"][0]["code"] == "fixed_horizon_only"
    # Neither interval excludes zero at the planned sample: now "no detectable difference" is the answer.
    report = build_report(experiment, _conversion_tree((2000, 100), (2000, 104)), {}, time.time())
    assert report["verdict"]["decision"] == "no_detectable_difference" and report["verdict"]["ready"]


def _revenue_group(values: list[float]) -> dict[str, Any]:
    sums = ArmSums.from_values(values)
    stats: dict[str, float] = {"x": sums.sum_x, "x2": sums.sum_x2}
    for k, (count, sx, sx2) in histogram_from_values(values).items():
        stats.update({f"h{k}:n": count, f"h{k}:x": sx, f"h{k}:x2": sx2})
    return {"n": sums.n, "revenue": stats}


def test_report_caps_revenue_at_the_pooled_quantile() -> None:
    settings: dict[str, Any] = {"primary_metric": "revenue", "metrics": ["revenue"], "min_visitors_per_arm": 10}
    experiment = ExperimentsFile.model_validate({"experiments": [two_arms(**settings)]}).experiments[0]
    rng = np.random.default_rng(7)
    control = (rng.lognormal(12.0, 1.5, 3000) * (rng.random(3000) < 0.05)).round().tolist()
    treatment = (rng.lognormal(12.0, 1.5, 3000) * (rng.random(3000) < 0.06)).round().tolist()
    tree = {"control": {"all": _revenue_group(control)}, "treatment": {"all": _revenue_group(treatment)}}
    result = build_report(experiment, tree, {}, time.time())["results"][0]
    cap = histogram_cap([histogram_from_values(control), histogram_from_values(treatment)])
    capped = relative_uplift(
        ArmSums.from_values(np.minimum(control, cap)), ArmSums.from_values(np.minimum(treatment, cap))
    )
    raw = relative_uplift(ArmSums.from_values(control), ArmSums.from_values(treatment))
    assert result["capped_at"] == cap and result["cap_quantile"] == 0.9
    assert result["uplift"] == pytest.approx(capped.uplift, rel=1e-9)
    assert result["ci_lower"] == pytest.approx(capped.ci_lower, rel=1e-9)
    assert result["p_value"] == pytest.approx(capped.p_value, rel=1e-7)
    assert result["uncapped"]["uplift"] == pytest.approx(raw.uplift, rel=1e-12)
    assert result["uncapped"]["ci_upper"] == pytest.approx(raw.ci_upper, rel=1e-12)
    # Sums stored before histograms existed: nothing to cap, the report says so and uses the raw sums.
    for group in tree.values():
        group["all"]["revenue"] = {k: v for k, v in group["all"]["revenue"].items() if not k.startswith("h")}
    result = build_report(experiment, tree, {}, time.time())["results"][0]
    assert result["capped_at"] is None and result["uncapped"] is None
    assert result["uplift"] == pytest.approx(raw.uplift, rel=1e-12)


def _cuped_group(y: np.ndarray, pre: np.ndarray, new: np.ndarray, metric: str) -> dict[str, Any]:
    # What the store keeps (store.sums.COVARIATE_STATS) for a 0/1 metric with a pre-period value c.
    c = np.where(new, 0.0, pre)
    has_pre = ~new
    stats = {
        "x": float(y.sum()),
        "x2": float((y * y).sum()),
        "c": float(c.sum()),
        "c2": float((c * c).sum()),
        "cn": float(has_pre.sum()),
        "cx": float((c * y).sum()),
        "cxp": float(y[has_pre].sum()),
    }
    return {"n": float(y.size), metric: stats}


def test_report_shows_cuped_beside_unadjusted_and_decides_on_it() -> None:
    # Heterogeneous buyers (Beta(0.1, 0.9) propensity) whose pre-period purchases predict conversion;
    # 20% new visitors (no pre-period). Treatment converts 25% more.
    rng = np.random.default_rng(0)

    def visitors(n: int, lift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = rng.beta(0.1, 0.9, n)
        pre = rng.binomial(30, p).astype(float)
        y = (rng.random(n) < np.minimum(p * lift, 1.0)).astype(float)
        return y, pre, rng.random(n) < 0.2

    control, treatment = visitors(3000, 1.0), visitors(3000, 1.25)
    settings: dict[str, Any] = {
        "primary_metric": "conversion",
        "metrics": ["conversion"],
        "planned_visitors": 8000,
        "min_visitors_per_arm": 100,
    }
    experiment = ExperimentsFile.model_validate({"experiments": [two_arms(**settings)]}).experiments[0]
    tree = {
        "control": {"all": _cuped_group(*control, "conversion")},
        "treatment": {"all": _cuped_group(*treatment, "conversion")},
    }
    report = build_report(experiment, tree, {}, time.time())
    result = report["results"][0]
    expected = cuped_uplift(CupedSums.from_values(*control), CupedSums.from_values(*treatment))
    cuped = result["cuped"]
    assert cuped["uplift"] == pytest.approx(expected.adjusted.uplift, rel=1e-9)
    assert cuped["ci_lower"] == pytest.approx(expected.adjusted.ci_lower, rel=1e-9)
    assert cuped["variance_reduction_pct"] == pytest.approx(100 * expected.variance_reduction, rel=1e-9)
    assert cuped["visitors_with_pre_period"]["control"] == float((~control[2]).sum())
    # The unadjusted numbers stay as they were, side by side.
    unadjusted = relative_uplift(ArmSums.from_values(control[0]), ArmSums.from_values(treatment[0]))
    assert result["uplift"] == pytest.approx(unadjusted.uplift) and result["p_value"] == pytest.approx(
        unadjusted.p_value
    )
    assert 30 < cuped["variance_reduction_pct"] < 60
    # Only the adjusted peeking-safe interval excludes zero here: the verdict reads it.
    assert not result["always_valid"]["significant"] and cuped["always_valid"]["significant"]
    verdict = report["verdict"]
    assert verdict["decision"] == "ship_treatment" and verdict["reasons"][0]["params"]["adjusted"] is True
    # Without pre-period sums there is no CUPED block and the verdict reads the unadjusted interval.
    for arm in tree.values():
        arm["all"]["conversion"] = {k: v for k, v in arm["all"]["conversion"].items() if not k.startswith("c")}
    plain = build_report(experiment, tree, {}, time.time())
    assert plain["results"][0]["cuped"] is None and plain["verdict"]["decision"] == "keep_running"


def test_report_cuped_on_capped_revenue() -> None:
    # Revenue with a pre-period covariate: the CUPED block adjusts the same capped values as the main one.
    rng = np.random.default_rng(11)

    def visitors(n: int, rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = rng.lognormal(12.0, 1.5, n).round() * (rng.random(n) < rate)
        c = np.log1p(y * rng.lognormal(0.0, 0.5, n) + rng.exponential(1000.0, n))
        return y, c, rng.random(n) < 0.3

    def group(y: np.ndarray, c: np.ndarray, new: np.ndarray) -> dict[str, Any]:
        stats = _revenue_group(list(y))["revenue"]
        cov = np.where(new, 0.0, c)
        stats.update(
            {
                "c": float(cov.sum()),
                "c2": float((cov * cov).sum()),
                "cn": float((~new).sum()),
                "cx": float((cov * y).sum()),
                "cxp": float(y[~new].sum()),
            }
        )
        for k, (count, sum_c, sum_cx, sum_x) in covariate_histogram_from_values(y, cov, new).items():
            stats.update({f"h{k}:cn": count, f"h{k}:c": sum_c, f"h{k}:cx": sum_cx, f"h{k}:xp": sum_x})
        return {"n": float(y.size), "revenue": stats}

    control, treatment = visitors(3000, 0.05), visitors(3000, 0.06)
    settings: dict[str, Any] = {"primary_metric": "revenue", "metrics": ["revenue"], "min_visitors_per_arm": 10}
    experiment = ExperimentsFile.model_validate({"experiments": [two_arms(**settings)]}).experiments[0]
    tree = {"control": {"all": group(*control)}, "treatment": {"all": group(*treatment)}}
    result = build_report(experiment, tree, {}, time.time())["results"][0]
    cap = result["capped_at"]
    assert cap == histogram_cap([histogram_from_values(control[0]), histogram_from_values(treatment[0])])
    expected = cuped_uplift(
        CupedSums.from_values(np.minimum(control[0], cap), control[1], control[2]),
        CupedSums.from_values(np.minimum(treatment[0], cap), treatment[1], treatment[2]),
    )
    assert result["cuped"]["uplift"] == pytest.approx(expected.adjusted.uplift, rel=1e-9)
    assert result["cuped"]["ci_upper"] == pytest.approx(expected.adjusted.ci_upper, rel=1e-9)
    assert result["cuped"]["variance_reduction_pct"] == pytest.approx(100 * expected.variance_reduction, rel=1e-6)
    # The unadjusted side of the CUPED block is the main (capped) comparison.
    assert expected.unadjusted.uplift == pytest.approx(result["uplift"], rel=1e-9)
