"""Runtime experiment management on real Redis: two replicas of the recommend service share one store; changes
made through replica A's admin API reach replica B within its poll interval, without a restart. Sticky
assignment, refused weight changes, promotion (with the model registry pin), the audit log and bad input."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.auth import hash_key
from services.common.clock import FixedClock
from services.common.models import ModelKind, ModelRegistry
from services.common.storage import open_store
from services.experiments.config import ExperimentsFile
from services.experiments.config_store import ExperimentConfigStore
from services.experiments.runtime import CONFIG_POLL_S
from services.features import schema as F
from services.recommend.app import create_app
from services.recommend.ranking.ranker import ModelMeta
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings
from tests.factories import make_item
from tests.recommend.test_ranker import tiny_booster

ADMIN, OTHER_ADMIN, READER = "admin-secret-key-1", "second-admin-key-2", "reader-secret-key-1"
NOW = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # the business clock of both replicas (no calendar dependence)
SEEDED_YAML = """
experiments:
  - key: seeded
    slot_kinds: [banner]
    arms:
      - {name: control, weight: 0.5, personalized: false}
      - {name: treatment, weight: 0.5, personalized: true}
"""
LATER = "2026-03-05T00:00:00+00:00"
SLOTS = [{"name": "home", "kind": "product", "count": 3}]


def launch(key: str = "launch", **extra: Any) -> dict[str, Any]:
    return {
        "key": key,
        "description": "model vs generic",
        "slot_kinds": ["product"],
        "arms": [
            {"name": "control", "weight": 0.5, "personalized": False},
            {"name": "treatment", "weight": 0.5, "personalized": True},
        ],
        "start": "2026-03-01T00:00:00+00:00",
        **extra,
    }


@dataclass
class Replicas:
    a: TestClient
    b: TestClient
    settings: RecommendSettings

    def call(self, client: TestClient, method: str, path: str, key: str = ADMIN, **kwargs: Any) -> Any:
        return client.request(method, path, headers={"X-API-Key": key}, **kwargs)

    def ok(self, client: TestClient, method: str, path: str, key: str = ADMIN, **kwargs: Any) -> Any:
        response = self.call(client, method, path, key, **kwargs)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def arm(self, client: TestClient, visitor: str) -> str | None:
        response = client.post(
            "/v1/recommend",
            json={"visitor_id": visitor, "slots": SLOTS, "context": {"device": "mobile"}},
            headers={"X-API-Key": READER},
        )
        assert response.status_code == 200, response.text
        experiment = response.json()["experiment"]
        return experiment["arm"] if experiment else None


def eventually(check: Callable[[], bool], timeout: float = 4 * CONFIG_POLL_S) -> float:
    """Seconds until `check` held (fails after `timeout`)."""
    started = time.perf_counter()
    while not check():
        assert time.perf_counter() - started < timeout, "the other replica did not follow in time"
        time.sleep(0.05)
    return time.perf_counter() - started


@pytest.fixture
def replicas(settings_factory: Callable[..., Any], tmp_path: Path) -> Iterator[Replicas]:
    (tmp_path / "experiments.yaml").write_text(SEEDED_YAML)
    keys = ",".join(
        [
            f"ops:admin:{hash_key(ADMIN)}",
            f"growth:admin:{hash_key(OTHER_ADMIN)}",
            f"web:recommend:{hash_key(READER)}",
        ]
    )
    settings: RecommendSettings = settings_factory(
        RecommendSettings, api_keys=keys, experiments_file=tmp_path / "experiments.yaml", log_impressions=False
    )
    with (
        TestClient(create_app(settings, FixedClock(NOW))) as a,
        TestClient(create_app(settings, FixedClock(NOW))) as b,
    ):
        items = [make_item(item_id=f"p{i:03d}", category=f"cat-{i % 4}").model_dump(mode="json") for i in range(20)]
        assert a.put("/v1/catalog/items", json={"items": items}, headers={"X-API-Key": ADMIN}).status_code == 200
        for client in (a, b):
            assert client.post("/v1/admin/reload", headers={"X-API-Key": ADMIN}).status_code == 200
        yield Replicas(a, b, settings)


def test_the_file_seeds_the_store_once_and_the_store_wins(replicas: Replicas, tmp_path: Path) -> None:
    listed = replicas.ok(replicas.a, "GET", "/v1/experiments")
    assert [e["key"] for e in listed["experiments"]] == ["seeded"] and listed["generation"] == 1
    # A changed file does not overrule the store; a forced seed does, and is audited.
    store = open_store(replicas.settings)
    try:
        config_store = ExperimentConfigStore(store)
        other = ExperimentsFile.model_validate({"experiments": [launch("from-file")]})
        stored, wrote = config_store.seed(other, force=False, actor="cli", now=NOW.timestamp())
        assert not wrote and [e.key for e in stored.config.experiments] == ["seeded"]
        stored, wrote = config_store.seed(other, force=True, actor="cli", now=NOW.timestamp())
        assert wrote and stored.generation == 2
    finally:
        store.close()
    eventually(
        lambda: [e["key"] for e in replicas.ok(replicas.b, "GET", "/v1/experiments")["experiments"]] == ["from-file"]
    )
    audit = replicas.ok(replicas.a, "GET", "/v1/experiments/audit")["entries"]
    assert {(e["action"], e["key"], e["actor"]) for e in audit[:2]} == {
        ("seed", "seeded", "cli"),
        ("seed", "from-file", "cli"),
    }


def test_an_experiment_created_and_started_on_one_replica_serves_on_the_other(replicas: Replicas) -> None:
    visitors = [f"v{i}" for i in range(40)]
    assert all(replicas.arm(replicas.b, v) is None for v in visitors[:5])  # nothing covers product slots yet
    created = replicas.ok(replicas.a, "POST", "/v1/experiments", json=launch())
    assert created["status"] == "disabled" and created["generation"] == 2
    started = replicas.ok(replicas.a, "PATCH", "/v1/experiments/launch", json={"enabled": True})
    assert started["status"] == "running"
    # Replica A answers with the new configuration at once; B within its poll interval, without a restart.
    assert replicas.arm(replicas.a, "v0") in {"control", "treatment"}
    waited = eventually(lambda: replicas.arm(replicas.b, "v0") is not None)
    assert waited <= 2 * CONFIG_POLL_S + 1
    on_a = {v: replicas.arm(replicas.a, v) for v in visitors}
    on_b = {v: replicas.arm(replicas.b, v) for v in visitors}
    assert on_a == on_b and set(on_a.values()) == {"control", "treatment"}
    # Stopping works the same way.
    replicas.ok(replicas.a, "PATCH", "/v1/experiments/launch", json={"enabled": False})
    eventually(lambda: replicas.arm(replicas.b, "v0") is None)


def test_raising_coverage_keeps_every_assigned_visitor(replicas: Replicas) -> None:
    replicas.ok(replicas.a, "POST", "/v1/experiments", json=launch(enabled=True, coverage=0.3))
    visitors = [f"cov-{i}" for i in range(300)]
    eventually(lambda: replicas.ok(replicas.b, "GET", "/v1/experiments")["generation"] == 2)
    before = {v: replicas.arm(replicas.b, v) for v in visitors}
    enrolled = {v: arm for v, arm in before.items() if arm is not None}
    assert 50 < len(enrolled) < 130  # about 30% of 300
    replicas.ok(replicas.a, "PATCH", "/v1/experiments/launch", json={"coverage": 0.9})
    eventually(lambda: replicas.ok(replicas.b, "GET", "/v1/experiments")["generation"] == 3)
    after = {v: replicas.arm(replicas.b, v) for v in visitors}
    assert all(after[v] == arm for v, arm in enrolled.items())  # sticky: nobody changed arm
    assert sum(arm is not None for arm in after.values()) > 230  # and more visitors are enrolled


def test_weight_changes_of_a_running_experiment_need_a_rebalance(replicas: Replicas) -> None:
    replicas.ok(replicas.a, "POST", "/v1/experiments", json=launch(enabled=True))
    refused = replicas.call(
        replicas.a, "PATCH", "/v1/experiments/launch", json={"weights": {"control": 0.2, "treatment": 0.8}}
    )
    assert refused.status_code == 409 and "rebalance" in refused.json()["detail"]
    assert replicas.ok(replicas.a, "GET", "/v1/experiments/launch")["arms"][0]["weight"] == 0.5  # unchanged
    changed = replicas.ok(
        replicas.a,
        "PATCH",
        "/v1/experiments/launch",
        json={"weights": {"control": 0.2, "treatment": 0.8}, "rebalance": True},
    )
    assert [arm["weight"] for arm in changed["arms"]] == [0.2, 0.8] and changed["bucket_version"] == 2
    # A disabled experiment has no running assignment to protect: its weights change without a rebalance.
    replicas.ok(replicas.a, "PATCH", "/v1/experiments/launch", json={"enabled": False})
    calm = replicas.ok(
        replicas.a, "PATCH", "/v1/experiments/launch", json={"weights": {"control": 0.5, "treatment": 0.5}}
    )
    assert calm["bucket_version"] == 2


def test_promoting_an_arm_ends_the_experiment_and_pins_its_model(replicas: Replicas) -> None:
    repository = RecommendRepository.open(replicas.settings)
    try:
        model = tiny_booster(list(F.RANKER_FEATURES))
        for version, at in (("v1", 1.0), ("v2", 2.0)):
            repository.save_model(model, ModelMeta(version, at, F.RANKER_FEATURES, F.FEATURE_SERVICE))
        arms = [
            {"name": "control", "weight": 0.5, "personalized": True, "model": "v1"},
            {"name": "challenger", "weight": 0.5, "personalized": True, "model": "v2"},
        ]
        typo = [arms[0], {**arms[1], "model": "v2-typo"}]
        refused = replicas.call(replicas.a, "POST", "/v1/experiments", json=launch(enabled=True, arms=typo))
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "arms.1.model"
        assert "v2-typo" in refused.json()["errors"][0]["message"]
        replicas.ok(replicas.a, "POST", "/v1/experiments", json=launch(enabled=True, arms=arms))
        # Replica B promotes at once: it checks the stored record, not its view (which may be a poll behind).
        unknown = replicas.call(replicas.b, "POST", "/v1/experiments/launch/promote", json={"arm": "nope"})
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "arm"
        promoted = replicas.ok(
            replicas.b, "POST", "/v1/experiments/launch/promote", key=OTHER_ADMIN, json={"arm": "challenger"}
        )
        assert promoted["winner"] == "challenger" and promoted["status"] == "ended"
        assert promoted["pinned_model"] == "v2" and datetime.fromisoformat(promoted["end"]) == NOW
        assert ModelRegistry(repository.store).index(ModelKind.RANKER).pinned == "v2"
        again = replicas.call(replicas.a, "POST", "/v1/experiments/launch/promote", json={"arm": "control"})
        assert again.status_code == 409
        eventually(
            lambda: replicas.call(replicas.a, "GET", "/v1/experiments/launch").json().get("winner") == "challenger"
        )
        assert replicas.arm(replicas.a, "anyone") is None  # ended: nobody is assigned any more
    finally:
        repository.close()
    entry = replicas.ok(replicas.a, "GET", "/v1/experiments/launch/audit")["entries"][0]
    assert entry["action"] == "promote" and entry["actor"] == "growth" and entry["at"] == NOW.isoformat()
    assert entry["before"]["winner"] is None and entry["after"]["winner"] == "challenger"


def test_every_change_is_audited_with_who_when_and_what(replicas: Replicas) -> None:
    replicas.ok(replicas.a, "POST", "/v1/experiments", json=launch())
    replicas.ok(
        replicas.b, "PATCH", "/v1/experiments/launch", key=OTHER_ADMIN, json={"coverage": 0.5, "description": "half"}
    )
    entries = replicas.ok(replicas.b, "GET", "/v1/experiments/launch/audit")["entries"]
    assert [(e["action"], e["actor"]) for e in entries] == [("change", "growth"), ("create", "ops")]
    change = entries[0]
    assert change["before"]["coverage"] == 1.0 and change["after"]["coverage"] == 0.5
    assert change["after"]["description"] == "half" and change["at"] == NOW.isoformat()
    assert entries[1]["before"] is None and change["generation"] == entries[1]["generation"] + 1
    everything = replicas.ok(replicas.a, "GET", "/v1/experiments/audit")["entries"]
    assert [e["key"] for e in everything] == ["launch", "launch", "seeded"]  # newest first, seeding included


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("POST", "/v1/experiments", launch(coverage=2), 422, "coverage"),
        ("POST", "/v1/experiments", {**launch(), "arms": []}, 422, "arms"),
        ("POST", "/v1/experiments", launch("seeded"), 409, None),
        ("PATCH", "/v1/experiments/nope", {"enabled": True}, 404, None),
        ("PATCH", "/v1/experiments/seeded", {"coverage": -0.1}, 422, "coverage"),
        ("PATCH", "/v1/experiments/seeded", {"weights": {"ghost": 1.0}}, 422, "weights.ghost"),
        ("PATCH", "/v1/experiments/seeded", {"weights": {"control": 0.9}}, 422, "weights"),
        ("PATCH", "/v1/experiments/seeded", {"enabled": None}, 422, "enabled"),
        ("PATCH", "/v1/experiments/seeded", {"colour": "red"}, 422, "colour"),
        ("PATCH", "/v1/experiments/seeded", {"start": LATER, "end": NOW.isoformat()}, 422, "experiments.0"),
        ("POST", "/v1/experiments/nope/promote", {"arm": "control"}, 404, None),
        ("GET", "/v1/experiments/nope/audit", None, 404, None),
    ],
)  # fmt: skip
def test_bad_input_is_refused_with_the_envelope_naming_the_field(
    replicas: Replicas, method: str, path: str, body: Any, status: int, field: str | None
) -> None:
    response = replicas.call(replicas.a, method, path, json=body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["error"] and answer["detail"]
    if field is not None:
        assert field in [e["field"] for e in answer["errors"]], answer
    assert replicas.ok(replicas.a, "GET", "/v1/experiments")["generation"] == 1  # nothing was stored
    assert replicas.call(replicas.a, method, path, key=READER, json=body).status_code == 403  # admin scope only


def test_the_cli_seeds_only_an_empty_store_unless_forced(
    settings_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from services.cli import app as cli

    settings: RecommendSettings = settings_factory(RecommendSettings)
    monkeypatch.setenv("SELARAS_NAMESPACE", settings.namespace)
    monkeypatch.setenv("SELARAS_REDIS_URL", str(settings.redis_url))
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(SEEDED_YAML)
    second.write_text(SEEDED_YAML.replace("key: seeded", "key: replaced"))

    def seed(*args: str) -> str:
        result = CliRunner().invoke(cli, ["experiments", "seed", *args, "--data-dir", str(tmp_path / "data")])
        assert result.exit_code == 0, result.output
        return result.output

    def stored_keys() -> list[str]:
        store = open_store(settings)
        try:
            stored = ExperimentConfigStore(store).load()
            assert stored is not None
            return [e.key for e in stored.config.experiments]
        finally:
            store.close()

    assert "generation 1" in seed(str(first))
    assert "--force" in seed(str(second)) and stored_keys() == ["seeded"]  # the store wins
    assert "generation 2" in seed(str(second), "--force") and stored_keys() == ["replaced"]


def test_an_arm_can_serve_its_own_ranking_configuration(replicas: Replicas) -> None:
    """Arms that differ in their candidate generators or diversity rule; unknown generator names are refused
    with the field, and the chosen arm carries its configuration to the ranking pipeline."""
    arms = [
        {"name": "control", "weight": 0.5, "personalized": True},
        {"name": "tags", "weight": 0.5, "personalized": True, "candidate_sources": ["covisitation", "nope"]},
    ]
    refused = replicas.call(replicas.a, "POST", "/v1/experiments", json=launch(arms=arms))
    assert refused.status_code == 422
    error = refused.json()["errors"][0]
    assert error["field"] == "arms.1.candidate_sources" and "'nope'" in error["message"]
    arms[1] = {**arms[1], "candidate_sources": ["covisitation", "shared_tags"], "max_per_category": 2}
    replicas.ok(replicas.a, "POST", "/v1/experiments", json=launch(enabled=True, arms=arms))
    eventually(lambda: replicas.arm(replicas.b, "someone") is not None)
    chosen = {}
    runtime = replicas.b.app.state.experiments.runtime  # type: ignore[attr-defined]
    for n in range(40):
        choice = runtime.assign_recommend(f"cfg-{n}", ["product"], NOW.timestamp())
        chosen[choice.arm] = choice
    assert chosen["tags"].candidate_sources == ("covisitation", "shared_tags")
    assert chosen["tags"].max_per_category == 2
    assert chosen["control"].candidate_sources is None and chosen["control"].max_per_category is None
