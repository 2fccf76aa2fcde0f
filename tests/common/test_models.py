"""The model registry: publish, pin, damage detection, on both stores (SQLite and a real Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.models import DamagedModel, ModelKind, ModelRegistry, UnknownModelVersion
from services.common.storage import Namespace, RedisStore, SqliteStore, Store, make_redis_client
from tests.conftest import REDIS_URL, unique_name


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened: Store = SqliteStore(tmp_path / "store.db")
    else:
        opened = RedisStore(make_redis_client(REDIS_URL, False, 5.0), unique_name("models"))
    try:
        yield opened
    finally:
        opened.close()


def test_publishing_makes_the_newest_serve_and_keeps_every_version(store: Store) -> None:
    registry = ModelRegistry(store)
    assert registry.index(ModelKind.RANKER).serving is None
    registry.publish(ModelKind.RANKER, "v1", b"one", created_at=1.0, meta=b'{"m": 1}')
    index = registry.publish(ModelKind.RANKER, "v2", b"two", created_at=2.0)
    assert index.newest == index.serving == "v2" and [v.version for v in index.versions] == ["v1", "v2"]
    assert index.load_order() == ["v2", "v1"]
    assert registry.blob(ModelKind.RANKER, "v1") == b"one"
    assert registry.metas(ModelKind.RANKER, ["v1", "v2"]) == [b'{"m": 1}', None]
    # Kinds are separate, and publishing a version again replaces it (still the newest).
    assert registry.index(ModelKind.MESSAGE).versions == ()
    again = registry.publish(ModelKind.RANKER, "v1", b"one again", created_at=3.0)
    assert [v.version for v in again.versions] == ["v2", "v1"] and registry.blob(ModelKind.RANKER, "v1") == b"one again"


def test_a_pin_holds_through_later_publishes_until_it_is_cleared(store: Store) -> None:
    registry = ModelRegistry(store)
    registry.publish(ModelKind.MESSAGE, "a", b"A", created_at=1.0)
    registry.publish(ModelKind.MESSAGE, "b", b"B", created_at=2.0)
    pinned = registry.set_production(ModelKind.MESSAGE, "a", at=10.0)
    assert pinned.serving == "a" and pinned.pinned_at == 10.0 and pinned.load_order() == ["a"]
    later = registry.publish(ModelKind.MESSAGE, "c", b"C", created_at=3.0)
    assert later.newest == "c" and later.serving == "a"
    assert ModelRegistry(store).serving_blob(ModelKind.MESSAGE) == ("a", b"A")  # another process sees the pin
    cleared = registry.set_production(ModelKind.MESSAGE, None, at=11.0)
    assert cleared.serving == "c" and cleared.pinned is None and cleared.pinned_at is None
    assert cleared.generation > later.generation > pinned.generation


def test_pinning_an_unknown_version_is_refused_and_changes_nothing(store: Store) -> None:
    registry = ModelRegistry(store)
    registry.publish(ModelKind.PERSONAS, "1", b"p", created_at=1.0)
    before = registry.index(ModelKind.PERSONAS)
    with pytest.raises(UnknownModelVersion, match="no personas model '7'"):
        registry.set_production(ModelKind.PERSONAS, "7", at=5.0)
    assert registry.index(ModelKind.PERSONAS) == before


def test_a_blob_altered_after_publishing_is_refused(store: Store) -> None:
    registry = ModelRegistry(store)
    registry.publish(ModelKind.RANKER, "v1", b"whole model", created_at=1.0)
    store.put(Namespace.MODELS, "ranker:v1", b"whole model, altered")
    with pytest.raises(DamagedModel, match="sha256"):
        registry.blob(ModelKind.RANKER, "v1")
    assert registry.blob(ModelKind.RANKER, "never-published") is None
