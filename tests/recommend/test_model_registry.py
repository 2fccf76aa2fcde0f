"""Serving follows the model registry: every replica converges to the pinned or newest ranker by itself, a
pin survives a restart, and the admin routes pin and list versions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.models import ModelKind
from services.experiments.config import ExperimentConfigError, load_config
from services.features import schema as F
from services.recommend.app import create_app
from services.recommend.ranking.ranker import ModelMeta
from services.recommend.repository import RecommendRepository
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from tests.recommend.test_ranker import tiny_booster


@pytest.fixture(scope="module")
def model_text() -> bytes:
    return tiny_booster(list(F.RANKER_FEATURES))


def publish(repository: RecommendRepository, version: str, text: bytes, created_at: float) -> None:
    repository.save_model(text, ModelMeta(version, created_at, F.RANKER_FEATURES, F.FEATURE_SERVICE))


def served(service: RecommendService) -> str | None:
    return service.model.meta.version if service.model else None


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> RecommendSettings:
    """Its own Redis namespace: what two replicas of one shop share."""
    settings: RecommendSettings = settings_factory(RecommendSettings, log_impressions=False)
    return settings


@pytest.fixture
def replicas(settings: RecommendSettings) -> Iterator[list[RecommendService]]:
    """Two replicas: their own repository (connections) and service each, one shared Redis namespace."""
    repositories = [RecommendRepository.open(settings) for _ in range(2)]
    try:
        yield [RecommendService(settings, repository) for repository in repositories]
    finally:
        for repository in repositories:
            repository.close()


def test_replicas_converge_to_a_pin_and_back_to_the_newest(replicas: list[RecommendService], model_text: bytes) -> None:
    a, b = replicas
    publish(a.repository, "v1", model_text, 1.0)
    publish(a.repository, "v2", model_text, 2.0)
    for replica in replicas:
        replica.follow_model_registry()
    assert [served(r) for r in replicas] == ["v2", "v2"]

    a.repository.models.set_production(ModelKind.RANKER, "v1", at=5.0)
    b.follow_model_registry()  # what b's refresh loop does every `refresh_interval_s`: no call to b needed
    assert served(b) == "v1"

    publish(a.repository, "v3", model_text, 3.0)  # a later training publishes, the pin holds
    for replica in replicas:
        replica.follow_model_registry()
    assert [served(r) for r in replicas] == ["v1", "v1"]

    a.repository.models.set_production(ModelKind.RANKER, None, at=6.0)
    for replica in replicas:
        replica.follow_model_registry()
    assert [served(r) for r in replicas] == ["v3", "v3"]


def test_a_pin_survives_a_restart_and_a_broken_pin_keeps_the_current_model(
    settings: RecommendSettings, model_text: bytes
) -> None:
    repository = RecommendRepository.open(settings)
    try:
        publish(repository, "v1", model_text, 1.0)
        publish(repository, "v2", model_text, 2.0)
        publish(repository, "broken", model_text[: len(model_text) // 2], 3.0)
        repository.models.set_production(ModelKind.RANKER, "v1", at=5.0)
        restarted = RecommendService(settings, repository)
        assert restarted.reload_model() == ("v1", None)
        # A pin to a version that cannot load is not silently replaced by another: the replica keeps what it
        # serves and readiness lists why.
        repository.models.set_production(ModelKind.RANKER, "broken", at=6.0)
        restarted.follow_model_registry()
        assert served(restarted) == "v1" and "broken" in restarted.skipped_models
    finally:
        repository.close()


def test_admin_routes_list_pin_and_refuse_unknown_versions(settings: RecommendSettings, model_text: bytes) -> None:
    repository = RecommendRepository.open(settings)
    try:
        publish(repository, "v1", model_text, 1.0)
        publish(repository, "v2", model_text, 2.0)
    finally:
        repository.close()
    with TestClient(create_app(settings)) as client:
        listed = client.get("/v1/admin/models/ranker").json()
        assert [v["version"] for v in listed["versions"]] == ["v2", "v1"]
        assert listed["serving"] == listed["loaded_here"] == "v2" and listed["pinned"] is None

        pinned = client.post("/v1/admin/models/ranker/production", json={"version": "v1"})
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["serving"] == pinned.json()["loaded_here"] == "v1"
        assert client.get("/readyz").json()["model_version"] == "v1"

        unknown = client.post("/v1/admin/models/ranker/production", json={"version": "v9"})
        assert unknown.status_code == 404 and unknown.json()["error"] == "UnknownModelVersion"
        bad_kind = client.post("/v1/admin/models/forest/production", json={"version": "v1"})
        assert bad_kind.status_code == 422 and bad_kind.json()["errors"][0]["field"] == "path.kind"
        assert client.get("/v1/admin/models/ranker").json()["serving"] == "v1"

        cleared = client.post("/v1/admin/models/ranker/production", json={"version": None})
        assert cleared.json()["pinned"] is None and cleared.json()["loaded_here"] == "v2"
        assert client.get("/v1/admin/models/message").json() == {
            "kind": "message",
            "versions": [],
            "newest": None,
            "pinned": None,
            "pinned_at": None,
            "serving": None,
            "loaded_here": None,
        }


MODEL_VS_MODEL = """
experiments:
  - key: ranker-v2
    enabled: true
    slot_kinds: [product]
    arms:
      - {name: current, weight: 0.5, personalized: true, model: v1}
      - {name: candidate, weight: 0.5, personalized: true, model: v2}
    control: current
    start: 2026-01-01T00:00:00+07:00
"""


def test_two_models_serve_side_by_side_as_the_arms_of_one_experiment(
    settings_factory: Callable[..., Any], model_text: bytes, tmp_path: Any
) -> None:
    """Model vs model: each arm is ranked by the version it names, both loaded in one process; the serving
    version (the newest here) is neither, and a version no arm names is let go."""
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(MODEL_VS_MODEL)
    settings: RecommendSettings = settings_factory(
        RecommendSettings, log_impressions=False, experiments_file=experiments
    )
    repository = RecommendRepository.open(settings)
    try:
        for n, version in enumerate(["v1", "v2", "v3"]):
            publish(repository, version, model_text, float(n))
    finally:
        repository.close()
    with TestClient(create_app(settings)) as client:
        service = client.app.state.recommend.service  # type: ignore[attr-defined]
        assert served(service) == "v3" and set(service.models.arm_models) == {"v1", "v2"}
        served_by: dict[str, set[str]] = {}
        for n in range(60):
            body = {"visitor_id": f"mvm-{n}", "slots": [{"name": "home", "count": 4}]}
            answer = client.post("/v1/recommend", json=body).json()
            if answer["experiment"] is not None:
                served_by.setdefault(answer["experiment"]["arm"], set()).add(answer["model_version"])
        assert served_by == {"current": {"v1"}, "candidate": {"v2"}}
        # An arm naming the serving version uses it, and a version no arm names any more is let go.
        client.post("/v1/admin/models/ranker/production", json={"version": "v1"})
        service.load_arm_models()
        assert served(service) == "v1" and set(service.models.arm_models) == {"v2"}
        # Pinning the other arm's version hands the outgoing one (v1) over to its arm at once: before any
        # refresh, the control arm is still ranked by v1, never by the new serving version.
        client.post("/v1/admin/models/ranker/production", json={"version": "v2"})
        assert served(service) == "v2" and "v1" in service.models.arm_models
        arms: dict[str, set[str]] = {}
        for n in range(60):
            body = {"visitor_id": f"mvm-{n}", "slots": [{"name": "home", "count": 4}]}
            answer = client.post("/v1/recommend", json=body).json()
            if answer["experiment"] is not None:
                arms.setdefault(answer["experiment"]["arm"], set()).add(answer["model_version"])
        assert arms == {"current": {"v1"}, "candidate": {"v2"}}


def test_an_arm_naming_a_model_must_be_personalized(tmp_path: Any) -> None:
    bad = tmp_path / "experiments.yaml"
    bad.write_text(
        MODEL_VS_MODEL.replace(
            "{name: current, weight: 0.5, personalized: true", "{name: current, weight: 0.5, personalized: false"
        )
    )
    with pytest.raises(ExperimentConfigError, match="names a model but is not personalized"):
        load_config(bad)
