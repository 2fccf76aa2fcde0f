"""The shared experiments configuration record on each backend of the store: seeding writes only into an empty
store (or with force), every change bumps the generation and is audited, a refused edit changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.common.errors import InvalidPayload
from services.common.settings import CommonSettings
from services.common.storage import open_store
from services.experiments.config import ExperimentsFile
from services.experiments.config_store import ExperimentConfigStore
from tests.conftest import REDIS_URL

NOW = 1_764_000_000.0


def experiment(key: str, description: str = "model vs generic") -> dict[str, Any]:
    return {
        "key": key,
        "description": description,
        "slot_kinds": ["product"],
        "arms": [
            {"name": "control", "weight": 0.5, "personalized": False},
            {"name": "treatment", "weight": 0.5, "personalized": True},
        ],
        "start": "2026-03-01T00:00:00+00:00",
    }


def config(*keys: str) -> ExperimentsFile:
    return ExperimentsFile.model_validate({"experiments": [experiment(k) for k in keys]})


@pytest.fixture(params=["redis", "sqlite"])
def configs(request: pytest.FixtureRequest, settings_factory: Callable[..., Any]) -> Iterator[ExperimentConfigStore]:
    settings: CommonSettings = settings_factory(redis_url=REDIS_URL if request.param == "redis" else None)
    store = open_store(settings)
    try:
        yield ExperimentConfigStore(store)
    finally:
        store.close()


def keys(configs: ExperimentConfigStore) -> list[str]:
    stored = configs.load()
    assert stored is not None
    return [e.key for e in stored.config.experiments]


def test_seeding_writes_only_into_an_empty_store_unless_forced(configs: ExperimentConfigStore) -> None:
    assert configs.load() is None
    stored, wrote = configs.seed(config("first"), force=False, actor="cli", now=NOW)
    assert wrote and stored.generation == 1 and keys(configs) == ["first"]
    # The store wins over a changed file ...
    stored, wrote = configs.seed(config("from-file"), force=False, actor="cli", now=NOW)
    assert not wrote and stored.generation == 1 and keys(configs) == ["first"]
    # ... unless forced, which is audited for the experiments before and after.
    stored, wrote = configs.seed(config("from-file"), force=True, actor="cli", now=NOW + 1)
    assert wrote and stored.generation == 2 and keys(configs) == ["from-file"]
    assert [(e["action"], e["key"], e["generation"]) for e in configs.audit()] == [
        ("seed", "from-file", 2),
        ("seed", "first", 2),
        ("seed", "first", 1),
    ]


def test_a_change_bumps_the_generation_and_records_before_and_after(configs: ExperimentConfigStore) -> None:
    configs.seed(config("launch"), force=False, actor="cli", now=NOW)

    def describe(data: dict[str, Any]) -> dict[str, Any]:
        data["experiments"][0]["description"] = "changed"
        return data

    stored = configs.change(describe, actor="admin-1", now=NOW + 60, action="update", key="launch")
    assert stored.generation == 2 and stored.config.experiments[0].description == "changed"
    loaded = configs.load()
    assert loaded is not None and loaded.generation == 2
    newest = configs.audit("launch", limit=1)
    assert len(newest) == 1
    entry = newest[0]
    assert (entry["actor"], entry["action"], entry["generation"], entry["ts"]) == ("admin-1", "update", 2, NOW + 60)
    assert entry["before"]["description"] == "model vs generic" and entry["after"]["description"] == "changed"
    assert configs.audit("other") == []


def test_a_refused_edit_changes_nothing(configs: ExperimentConfigStore) -> None:
    configs.seed(config("launch"), force=False, actor="cli", now=NOW)

    def break_weights(data: dict[str, Any]) -> dict[str, Any]:
        data["experiments"][0]["arms"][0]["weight"] = "heavy"
        return data

    with pytest.raises(InvalidPayload, match="invalid experiment configuration"):
        configs.change(break_weights, actor="admin-1", now=NOW + 60, action="update", key="launch")
    loaded = configs.load()
    assert loaded is not None and loaded.generation == 1 and loaded.config == config("launch")
    assert len(configs.audit()) == 1  # the seed only
