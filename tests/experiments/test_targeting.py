"""Targeting and namespaces: who enters an experiment, decided before assignment and frozen at exposure; mutual
exclusion within a namespace (GrowthBook's inNamespace), refused overlaps; through the admin API on real Redis."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.experiments.assignment import in_namespace
from services.experiments.config import ExperimentConfigError, ExperimentsFile, load_config
from services.experiments.runtime import ExperimentRuntime
from services.experiments.stats.srm import srm_check
from services.experiments.store.base import ExposureWrite
from services.experiments.store.sqlite_store import SqliteExperimentStore
from services.experiments.targeting import (
    SESSION_GAP_S,
    ExperimentTargeting,
    TargetingContext,
    is_returning,
    targeting_context,
)
from services.features.aggregations import SESSION_GAP_S as PROFILE_SESSION_GAP_S
from tests.conftest import unique_name
from tests.experiments.test_admin_api import READER, SLOTS, Replicas, launch, replicas  # noqa: F401

NOW = 1_772_445_600.0  # 2026-03-02 10:00 UTC: a fixed moment (no calendar dependence)

# growthbook/growthbook packages/sdk-js/test/cases.json, "inNamespace": (visitor id, namespace, expected).
GROWTHBOOK_NAMESPACE_CASES: list[tuple[str, tuple[str, float, float], bool]] = [
    ("1", ("namespace1", 0, 0.4), False),
    ("1", ("namespace1", 0.4, 1), True),
    ("1", ("namespace2", 0, 0.4), False),
    ("1", ("namespace2", 0.4, 1), True),
    ("2", ("namespace1", 0, 0.4), False),
    ("2", ("namespace1", 0.4, 1), True),
    ("2", ("namespace2", 0, 0.4), False),
    ("2", ("namespace2", 0.4, 1), True),
    ("3", ("namespace1", 0, 0.4), False),
    ("3", ("namespace1", 0.4, 1), True),
    ("3", ("namespace2", 0, 0.4), True),
    ("3", ("namespace2", 0.4, 1), False),
    ("4", ("namespace1", 0, 0.4), False),
    ("4", ("namespace1", 0.4, 1), True),
    ("4", ("namespace2", 0, 0.4), True),
    ("4", ("namespace2", 0.4, 1), False),
]


def experiment(key: str = "exp", **extra: Any) -> dict[str, Any]:
    return {
        "key": key,
        "enabled": True,
        "slot_kinds": ["product"],
        "arms": [
            {"name": "control", "weight": 0.5, "personalized": False},
            {"name": "treatment", "weight": 0.5, "personalized": True},
        ],
        **extra,
    }


def runtime_for(tmp_path: Path, *experiments: dict[str, Any]) -> ExperimentRuntime:
    config = ExperimentsFile.model_validate({"experiments": list(experiments)})
    return ExperimentRuntime(config, SqliteExperimentStore(tmp_path / f"{unique_name('tg')}.db"))


# -- the conditions ---------------------------------------------------------------------------------------------------


def test_session_gap_is_the_profile_aggregators() -> None:
    assert SESSION_GAP_S == PROFILE_SESSION_GAP_S


def test_conditions_all_must_match_and_each_accepts_any_of_its_values() -> None:
    targeting = ExperimentTargeting(
        devices=["mobile", "app"], cities=["Jakarta", "Bandung"], lifecycles=["new", "active"]
    )
    jakarta_phone = TargetingContext(device="mobile", city="jakarta", lifecycle="active")
    assert targeting.matches(jakarta_phone)  # cities compare without case
    assert not targeting.matches(TargetingContext(device="desktop", city="Jakarta", lifecycle="active"))
    assert not targeting.matches(TargetingContext(device="mobile", city="Surabaya", lifecycle="active"))
    assert not targeting.matches(TargetingContext(device="mobile", city="Jakarta", lifecycle="loyal"))
    # An unknown attribute matches no condition on it; a condition left out accepts everybody.
    assert not targeting.matches(TargetingContext(device=None, city="Jakarta", lifecycle="new"))
    assert ExperimentTargeting(personas=["Pemburu Diskon"]).matches(TargetingContext(persona="pemburu diskon"))
    assert ExperimentTargeting(channels=["app"]).matches(TargetingContext(channel="APP", device=None))
    returning_only = ExperimentTargeting(visitor="returning")
    assert returning_only.matches(TargetingContext(returning=True))
    assert not returning_only.matches(TargetingContext(returning=False))
    assert ExperimentTargeting(visitor="new").matches(TargetingContext())


@pytest.mark.parametrize(
    ("targeting", "field"),
    [
        ({}, "experiments.0.targeting"),
        ({"devices": ["watch"]}, "experiments.0.targeting.devices.0"),
        ({"devices": []}, "experiments.0.targeting.devices"),
        ({"lifecycles": ["vip"]}, "experiments.0.targeting.lifecycles.0"),
        ({"visitor": "old"}, "experiments.0.targeting.visitor"),
        ({"country": ["ID"]}, "experiments.0.targeting.country"),
        ({"cities": [" "]}, "experiments.0.targeting.cities.0"),
    ],
)
def test_invalid_targeting_is_refused_naming_the_field(tmp_path: Path, targeting: dict[str, Any], field: str) -> None:
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump({"experiments": [experiment(targeting=targeting)]}))
    with pytest.raises(ExperimentConfigError, match=field.replace(".", r"\.")):
        load_config(path)


def test_returning_means_a_session_before_the_current_one() -> None:
    assert not is_returning(None, NOW)  # never seen (or not readable): new
    first_session = {"event_count": 4, "session_depth": 4, "last_seen_ts": NOW - 60}
    assert not is_returning(first_session, NOW)
    assert is_returning({**first_session, "event_count": 9}, NOW)  # five events before this session
    assert is_returning({**first_session, "last_seen_ts": NOW - SESSION_GAP_S - 1}, NOW)  # this request starts one
    assert not is_returning({"event_count": 0, "session_depth": 0, "last_seen_ts": NOW - 10 * SESSION_GAP_S}, NOW)
    context = targeting_context(
        device="mobile", channel="web", city=None, row={**first_session, "city": "Medan", "lifecycle": "new"},
        persona="Sultan", now=NOW,
    )  # fmt: skip
    assert context == TargetingContext("mobile", "Medan", "web", "Sultan", "new", False)  # the visitor's city


# -- frozen at exposure -----------------------------------------------------------------------------------------------


def test_a_visitor_who_stops_matching_keeps_the_arm_once_exposed(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, experiment(targeting={"visitor": "new", "devices": ["mobile"]}))
    new_phone = TargetingContext(device="mobile", returning=False)
    returning_phone = TargetingContext(device="mobile", returning=True)
    visitors = [f"t{i}" for i in range(400)]
    first = {v: runtime.assign_recommend(v, ["product"], NOW, new_phone) for v in visitors}
    assert all(choice is not None for choice in first.values())
    # Nobody who does not match enters, and without a context (nothing known) nobody does.
    assert all(runtime.assign_recommend(v, ["product"], NOW, returning_phone) is None for v in visitors)
    assert all(runtime.assign_recommend(v, ["product"], NOW) is None for v in visitors[:50])
    exposed = visitors[:200]
    for v in exposed:
        choice = first[v]
        assert choice is not None
        runtime.store.record_exposure(ExposureWrite("exp@1", v, choice.arm, "unknown", NOW, {"all": {"ctr": 3.0}}))
    # Exposed visitors keep their arm when they come back as returning visitors on a desktop; the others stay out.
    later = TargetingContext(device="desktop", returning=True)
    assert all(runtime.assign_recommend(v, ["product"], NOW + 86_400, later) == first[v] for v in exposed)
    assert all(runtime.assign_recommend(v, ["product"], NOW + 86_400, later) is None for v in visitors[200:])
    # Only those counted: the report's visitors are the exposed ones.
    report = runtime.report("exp", NOW + 86_400)
    assert sum(arm["n"] for arm in report["arms"]) == len(exposed)


def test_a_targeted_message_experiment_reads_the_context(tmp_path: Path) -> None:
    runtime = runtime_for(
        tmp_path,
        {**experiment("push-exp", targeting={"lifecycles": ["at_risk"]}), "slot_kinds": [], "channels": ["push"]},
    )
    assert runtime.targets_messages
    assert runtime.assign_message("m1", "push", NOW, TargetingContext(lifecycle="at_risk")) is not None
    assert runtime.assign_message("m1", "push", NOW, TargetingContext(lifecycle="loyal")) is None
    assert not runtime_for(tmp_path, experiment()).targets_messages


# -- namespaces -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("visitor", "namespace", "expected"), GROWTHBOOK_NAMESPACE_CASES)
def test_in_namespace_matches_growthbook(visitor: str, namespace: tuple[str, float, float], expected: bool) -> None:
    assert in_namespace(visitor, namespace[0], (namespace[1], namespace[2])) is expected


def test_experiments_of_one_namespace_never_share_a_visitor(tmp_path: Path) -> None:
    """20,000 synthetic visitors, two experiments on two surfaces in one namespace: nobody is in both, each gets
    its range's share (±1.5 points) and splits it between its arms by the weights (no SRM)."""
    runtime = runtime_for(
        tmp_path,
        experiment("home", namespace="homepage", namespace_range=[0.0, 0.3]),
        {**experiment("hero", namespace="homepage", namespace_range=[0.3, 0.7]), "slot_kinds": ["banner"]},
    )
    visitors = [f"ns-visitor-{i}" for i in range(20_000)]
    home = {v: runtime.assign_recommend(v, ["product"], NOW) for v in visitors}
    hero = {v: runtime.assign_recommend(v, ["banner"], NOW) for v in visitors}
    assert not [v for v in visitors if home[v] is not None and hero[v] is not None]
    for assigned, share in ((home, 0.3), (hero, 0.4)):
        arms = Counter(choice.arm for choice in assigned.values() if choice is not None)
        assert abs(sum(arms.values()) / len(visitors) - share) < 0.015, arms
        _, p_value, flagged = srm_check([arms["control"], arms["treatment"]], [0.5, 0.5])
        assert not flagged and p_value > 0.001, arms
    # Outside both ranges (30% of visitors): in neither experiment.
    neither = sum(home[v] is None and hero[v] is None for v in visitors) / len(visitors)
    assert abs(neither - 0.3) < 0.015


@pytest.mark.parametrize(
    ("second", "refused"),
    [
        ({"namespace_range": [0.4, 1.0]}, True),  # overlaps [0, 0.5)
        ({"namespace_range": [0.4, 1.0], "slot_kinds": ["cta"]}, True),  # other surface, same namespace: still one
        ({"namespace_range": [0.5, 1.0]}, False),  # adjacent ranges share no visitor
        ({"namespace_range": [0.4, 1.0], "enabled": False}, False),  # disabled: assigns nobody
        ({"namespace_range": [0.4, 1.0], "namespace": "other"}, False),
        ({"namespace_range": [0.4, 1.0], "start": "2026-02-01T00:00:00+00:00"}, False),  # after the first ends
    ],
)
def test_overlapping_ranges_of_one_namespace_are_refused(second: dict[str, Any], refused: bool) -> None:
    first = experiment("first", namespace="home", namespace_range=[0.0, 0.5], end="2026-01-31T00:00:00+00:00")
    data = {"experiments": [first, experiment("second", **{"namespace": "home", **second})]}
    if refused:
        with pytest.raises(ValueError, match=r"experiments\.1\.namespace_range: \[0\.4, 1\) overlaps \[0, 0\.5\)"):
            ExperimentsFile.model_validate(data)
    else:
        ExperimentsFile.model_validate(data)


def test_a_namespace_range_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="start < end"):
        ExperimentsFile.model_validate({"experiments": [experiment(namespace="n", namespace_range=[0.5, 0.5])]})


# -- through the admin API and the recommend service (real Redis) -----------------------------------------------------


def arm_of(pair: Replicas, visitor: str, device: str) -> str | None:
    response = pair.a.post(
        "/v1/recommend",
        json={"visitor_id": visitor, "slots": SLOTS, "context": {"device": device}},
        headers={"X-API-Key": READER},
    )
    assert response.status_code == 200, response.text
    chosen = response.json()["experiment"]
    return chosen["arm"] if chosen else None


def test_targeting_through_the_api_and_serving(replicas: Replicas) -> None:  # noqa: F811
    bad = replicas.call(replicas.a, "POST", "/v1/experiments", json=launch(targeting={"devices": ["watch"]}))
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "targeting.devices.0", bad.text
    empty = replicas.call(replicas.a, "POST", "/v1/experiments", json=launch(targeting={}))
    assert empty.status_code == 422 and empty.json()["errors"][0]["field"] == "targeting", empty.text
    created = replicas.ok(
        replicas.a, "POST", "/v1/experiments", json=launch(enabled=True, targeting={"devices": ["mobile"]})
    )
    assert created["targeting"]["devices"] == ["mobile"]
    visitors = [f"tg-{i}" for i in range(30)]
    on_phone = {v: arm_of(replicas, v, "mobile") for v in visitors}
    assert set(on_phone.values()) == {"control", "treatment"}
    # Desktop visitors never seen on a phone are not in the experiment; the phone visitors keep their arm.
    assert all(arm_of(replicas, f"desk-{i}", "desktop") is None for i in range(30))
    assert {v: arm_of(replicas, v, "desktop") for v in visitors} == on_phone
    report = replicas.ok(replicas.a, "GET", "/v1/experiments/launch/report")
    assert sum(arm["n"] for arm in report["arms"]) == len(visitors)
    # Changed at runtime: desktops may enter from now on; a bad condition is a 422 naming it.
    refused = replicas.call(replicas.a, "PATCH", "/v1/experiments/launch", json={"targeting": {"lifecycles": ["vip"]}})
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "targeting.lifecycles.0"
    changed = replicas.ok(replicas.a, "PATCH", "/v1/experiments/launch", json={"targeting": {"devices": ["desktop"]}})
    assert changed["targeting"]["devices"] == ["desktop"]
    assert arm_of(replicas, "desk-0", "desktop") is not None
    assert {v: arm_of(replicas, v, "mobile") for v in visitors} == on_phone  # exposed phone visitors stay
    assert arm_of(replicas, "phone-new", "mobile") is None
    cleared = replicas.ok(replicas.a, "PATCH", "/v1/experiments/launch", json={"targeting": None})
    assert cleared["targeting"] is None and arm_of(replicas, "phone-new", "mobile") is not None


def test_namespace_overlap_is_refused_through_the_api(replicas: Replicas) -> None:  # noqa: F811
    replicas.ok(replicas.a, "POST", "/v1/experiments", json=launch("left", enabled=True, namespace="home",
                                                                      namespace_range=[0.0, 0.5]))  # fmt: skip
    overlapping = launch("right", enabled=True, namespace="home", namespace_range=[0.4, 1.0])
    refused = replicas.call(replicas.a, "POST", "/v1/experiments", json=overlapping)
    assert refused.status_code == 422, refused.text
    error = refused.json()["errors"][0]
    assert error["field"] == "experiments.2.namespace_range" and "'left'" in error["message"], error
    # Created disabled, it is accepted; enabling it is refused the same way, and nothing changed.
    replicas.ok(replicas.a, "POST", "/v1/experiments", json={**overlapping, "enabled": False})
    enabling = replicas.call(replicas.a, "PATCH", "/v1/experiments/right", json={"enabled": True})
    assert enabling.status_code == 422 and enabling.json()["errors"][0]["field"] == "experiments.2.namespace_range"
    assert replicas.ok(replicas.a, "GET", "/v1/experiments/right")["enabled"] is False
