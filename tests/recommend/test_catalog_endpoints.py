"""Catalog routes beyond the bulk upsert: read, list, partial update (compare-and-set) and delete."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.catalog import CatalogItem
from services.recommend.app import create_app
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings


def product(item_id: str, price: float = 100_000.0, **extra: Any) -> dict[str, Any]:
    return {"item_id": item_id, "title": f"Produk {item_id}", "category": "sepatu", "price": price, **extra}


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> RecommendSettings:
    made: RecommendSettings = settings_factory(RecommendSettings, log_impressions=False, refresh_interval_s=3600)
    return made


@pytest.fixture
def client(settings: RecommendSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        items = [product(f"p{i:02d}", 10_000.0 * (i + 1)) for i in range(5)]
        items.append({"item_id": "b1", "kind": "banner", "title": "Promo gajian"})
        assert client.put("/v1/catalog/items", json={"items": items}).status_code == 200
        yield client


def test_read_list_and_page_through_the_catalog(client: TestClient) -> None:
    assert client.get("/v1/catalog/items/p01").json()["price"] == 20_000.0
    assert client.get("/v1/catalog/items/%20p01%20").json()["item_id"] == "p01"  # path ids normalised like bodies
    first = client.get("/v1/catalog/items", params={"kind": "product", "limit": 3}).json()
    assert [i["item_id"] for i in first["items"]] == ["p00", "p01", "p02"] and first["next_after"] == "p02"
    rest = client.get("/v1/catalog/items", params={"kind": "product", "limit": 3, "after": "p02"}).json()
    assert [i["item_id"] for i in rest["items"]] == ["p03", "p04"] and rest["next_after"] is None
    assert [i["item_id"] for i in client.get("/v1/catalog/items?kind=banner").json()["items"]] == ["b1"]
    missing = client.get("/v1/catalog/items/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "NotFound"
    too_many = client.get("/v1/catalog/items", params={"limit": 5000})
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "query.limit"


def test_patch_changes_only_the_given_fields_and_validates_the_result(client: TestClient) -> None:
    patched = client.patch("/v1/catalog/items/p00", json={"price": 7_500, "stock": 0})
    assert patched.status_code == 200, patched.text
    assert patched.json() | {"price": 7_500.0, "stock": 0} == patched.json()
    assert client.get("/v1/catalog/items/p00").json()["title"] == "Produk p00"  # untouched fields kept

    negative = client.patch("/v1/catalog/items/p00", json={"price": -1})
    assert negative.status_code == 422 and negative.json()["errors"][0]["field"] == "price"
    unknown_field = client.patch("/v1/catalog/items/p00", json={"colour": "red"})
    assert unknown_field.status_code == 422 and unknown_field.json()["errors"][0]["field"] == "colour"
    renamed = client.patch("/v1/catalog/items/p00", json={"item_id": "p99"})
    assert renamed.status_code == 422 and renamed.json()["errors"][0]["field"] == "item_id"
    empty = client.patch("/v1/catalog/items/p00", json={})
    assert empty.status_code == 422
    assert client.patch("/v1/catalog/items/nope", json={"price": 1}).status_code == 404
    assert client.get("/v1/catalog/items/p00").json()["price"] == 7_500.0  # refused patches stored nothing


def test_deleted_items_are_gone_and_leave_the_item_cache(client: TestClient) -> None:
    app_state = client.app.state.recommend  # type: ignore[attr-defined]
    app_state.service.refresh_cache()
    assert "p03" in app_state.service.snapshot.ids
    assert client.delete("/v1/catalog/items/p03").status_code == 204
    assert client.get("/v1/catalog/items/p03").status_code == 404
    assert client.delete("/v1/catalog/items/p03").status_code == 404
    app_state.service.refresh_cache()  # what every replica's refresh loop does on a new catalog version
    assert "p03" not in app_state.service.snapshot.ids and "p02" in app_state.service.snapshot.ids


def test_concurrent_partial_updates_of_one_item_all_land(settings: RecommendSettings) -> None:
    """A price feed and a stock feed patching the same item at once: compare-and-set keeps both."""
    repository = RecommendRepository.open(settings)
    try:
        repository.upsert_catalog([CatalogItem.model_validate(product("hot", tags=[]))])
        rounds = 25
        barrier = threading.Barrier(2)

        def add_tag(prefix: str) -> None:
            barrier.wait()
            for n in range(rounds):
                repository.update_catalog_item(
                    "hot", lambda item, t=f"{prefix}{n}": item.model_copy(update={"tags": [*item.tags, t]})
                )

        threads = [threading.Thread(target=add_tag, args=(p,)) for p in ("price", "stock")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        item = repository.catalog_item("hot")
        assert item is not None and len(item.tags) == 2 * rounds and len(set(item.tags)) == 2 * rounds
    finally:
        repository.close()
