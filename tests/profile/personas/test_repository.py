"""The persona repository on each backend (Redis + Feast on Redis, SQLite + Feast on SQLite): models and the
report round-trip, the job reads visitor states as stored, and its rows reach Feast and the offline history."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from services.common.models import ModelKind, ModelRegistry
from services.common.storage import Namespace
from services.features import schema as F
from services.profile.personas import TRAIT_NAMES, Persona, PersonaModel
from services.profile.personas.repository import PersonaRepository, load_model, load_report
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from tests.conftest import REDIS_URL
from tests.factories import BASE_TIME, make_visitor_state, visitor_row


@pytest.fixture(params=["redis", "sqlite"])
def personas(request: pytest.FixtureRequest, settings_factory: Callable[..., Any]) -> Iterator[PersonaRepository]:
    settings: ProfileSettings = settings_factory(
        ProfileSettings, redis_url=REDIS_URL if request.param == "redis" else None
    )
    profile = ProfileRepository.open(settings)
    try:
        yield PersonaRepository(profile.store, profile.feature_store, settings.offline_dir)
    finally:
        profile.close()


def persona_model(version: int) -> PersonaModel:
    """Two personas over the real traits (the repository stores any model; fitting one is not its business)."""
    n = len(TRAIT_NAMES)
    return PersonaModel(
        version=version,
        created_at=(BASE_TIME + timedelta(days=version)).isoformat(),
        k=2,
        silhouette_by_k={2: 0.5},
        trait_names=list(TRAIT_NAMES),
        log_traits=[False] * n,
        center=[0.0] * n,
        scale=[1.0] * n,
        clip=3.0,
        centres=[[-1.0] * n, [1.0] * n],
        personas=[Persona(i, f"P{i}", f"P{i}", "id", "en", 5, 0.5, []) for i in (1, 2)],
        next_id=3,
    )


def test_the_serving_model_is_the_pinned_one_else_the_newest(personas: PersonaRepository) -> None:
    assert personas.serving_model() is None and personas.newest_model() is None
    personas.save_model(persona_model(1))
    personas.save_model(persona_model(2))
    newest, serving = personas.newest_model(), personas.serving_model()
    assert newest is not None and serving is not None and (newest.version, serving.version) == (2, 2)
    assert newest.persona_ids == [1, 2] and newest.trait_names == list(TRAIT_NAMES)
    ModelRegistry(personas.store).set_production(ModelKind.PERSONAS, "1", BASE_TIME.timestamp())
    pinned = load_model(personas.store)  # what the endpoints read, from the store alone
    assert pinned is not None and pinned.version == 1
    newest = personas.newest_model()
    assert newest is not None and newest.version == 2  # the next fit continues from the newest


def test_the_report_is_replaced_by_the_next_run(personas: PersonaRepository) -> None:
    assert personas.report() is None
    personas.save_report({"version": 1, "assigned": {"1": 3}})
    personas.save_report({"version": 2, "assigned": {"1": 2, "2": 1}})
    assert personas.report() == load_report(personas.store) == {"version": 2, "assigned": {"1": 2, "2": 1}}


def test_visitor_states_read_as_stored(personas: PersonaRepository) -> None:
    states = {v: make_visitor_state(v, applied_position=p) for v, p in (("v1", "3-0"), ("v2", ""), ("v3", "9-1"))}
    # Written the way the aggregator writes them (the job only reads states).
    personas.store.put_many(Namespace.VISITOR_STATE, {k: orjson.dumps(s) for k, s in states.items()})
    assert sorted(key for key, _ in personas.visitor_state_records()) == ["v1", "v2", "v3"]
    assert sorted(s.visitor_id for s in personas.iter_visitor_states()) == ["v1", "v2", "v3"]
    assert personas.visitor_states(["v3", "gone", "v1"]) == [states["v3"], states["v1"]]
    assert personas.applied_positions(["v1", "v2", "gone"]) == {"v1": "3-0", "v2": ""}


def test_rows_reach_feast_and_the_offline_history_and_persona_ids_are_rewritten_once(
    personas: PersonaRepository,
) -> None:
    rows = [{**visitor_row(make_visitor_state(v)), "persona_id": -1} for v in ("v1", "v2", "v3")]
    personas.write_visitor_rows(rows)
    personas.write_visitor_rows([{**rows[0], F.TIMESTAMP_FIELD: BASE_TIME + timedelta(days=1), "persona_id": 2}])
    assert [r["event_count"] for r in personas.online_rows(["v1", "v3", "missing"])] == [3, 3, None]
    assert personas.online_rows(["v1"])[0]["persona_id"] == 2
    history = personas.offline_dir / F.VISITOR_VIEW
    assert len(list(history.glob("*.parquet"))) == 2

    def persona_ids(selected: list[dict[str, Any]]) -> np.ndarray:
        assert set(selected[0]) == {"event_count"}  # only the columns asked for
        return np.full(len(selected), 2, dtype=np.int64)

    assert personas.rewrite_offline_persona_ids(["event_count"], persona_ids) == (3, 1)  # the v1 row had 2 already
    assert set(pq.read_table(history, columns=["persona_id"])["persona_id"].to_pylist()) == {2}
    assert personas.rewrite_offline_persona_ids(["event_count"], persona_ids) == (0, 0)
