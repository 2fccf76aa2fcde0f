"""End to end on real Redis: events -> profile service -> Feast -> LightGBM -> /v1/recommend."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.settings import CommonSettings
from services.common.storage import Namespace
from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings
from tests.conftest import SessionWorld

SLOTS = [
    {"name": "home", "kind": "product", "count": 12},
    {"name": "hero", "kind": "banner", "count": 1},
    {"name": "cta", "kind": "cta", "count": 2},
]


def fork_values(fork: CommonSettings) -> dict[str, Any]:
    return fork.model_dump(include={"data_dir", "redis_url", "namespace", "feast_project", "environment"})


@pytest.fixture(scope="module")
def clients(world: SessionWorld, world_fork: CommonSettings) -> Iterator[tuple[TestClient, TestClient]]:
    # On a copy of the world: these tests send events, log impressions and upsert an item, which would add
    # visitors and move item statistics of the world later tests assert on (the persona job's counts).
    common = fork_values(world_fork)
    # No offline rows: these tests read online rows only.
    profile = ProfileSettings(**common, aggregator_idle_s=0.005, offline_rows=False)
    recommend = RecommendSettings(**common, refresh_interval_s=0.5)
    with (
        TestClient(create_profile_app(profile, world.clock)) as profile_client,
        TestClient(create_recommend_app(recommend, world.clock)) as recommend_client,
    ):
        yield profile_client, recommend_client


def recommend(client: TestClient, visitor: str, **extra: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/recommend",
        json={"visitor_id": visitor, "context": {"device": "mobile", "city": "Jakarta"}, "slots": SLOTS, **extra},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_training_beats_popularity_on_the_time_split(world: SessionWorld) -> None:
    metrics = world.world.train_metrics
    assert metrics["source"] == "behaviour"
    assert metrics["ndcg@10"] > metrics["popularity_ndcg@10"] + 0.02, metrics
    assert metrics["candidate_recall"] > 0.3, metrics


def test_known_visitor_gets_personalized_slots(clients: tuple[TestClient, TestClient], world: SessionWorld) -> None:
    _, client = clients
    visitor = world.world.simulator.visitors[0].visitor_id
    body = recommend(client, visitor, explain=True)
    assert body["strategy"] == "personalized" and body["fallback"] is False
    assert body["model_version"] == world.world.model_version
    home, hero, cta = body["slots"]
    assert len(home["items"]) == 12 and len(hero["items"]) == 1 and len(cta["items"]) == 2
    ids = [item["item_id"] for slot in body["slots"] for item in slot["items"]]
    assert len(ids) == len(set(ids)), "an item appears twice across slots"
    assert all(item["reasons"] for item in home["items"])
    categories = [item["category"] for item in home["items"]]
    assert max(categories.count(c) for c in set(categories)) <= 4  # diversity rule


def test_anonymous_visitor_gets_popular_in_context(clients: tuple[TestClient, TestClient]) -> None:
    _, client = clients
    body = recommend(client, "someone-new")
    assert body["strategy"] == "popular_in_context" and body["fallback"] is False
    assert len(body["slots"][0]["items"]) == 12


def test_viewing_a_category_ranks_it_higher_within_one_second(
    clients: tuple[TestClient, TestClient], world: SessionWorld
) -> None:
    profile, client = clients
    shop = world.world.shop
    visitor = world.world.simulator.visitors[1].visitor_id
    before = recommend(client, visitor)["slots"][0]["items"]
    shown_categories = {item["category"] for item in before}
    category = next(p.category for p in shop.products if p.category not in shown_categories and p.in_stock)
    items = [p for p in shop.products if p.category == category and p.in_stock][:6]
    now = world.clock.now_datetime()
    events = [
        {
            "event_id": f"e2e-{visitor}-{i}",
            "visitor_id": visitor,
            "type": "product_view",
            "item_id": item.item_id,
            "price": item.price,
            "timestamp": (now + timedelta(seconds=i)).isoformat(),
            "context": {"device": "mobile", "city": "Jakarta", "session_id": "e2e"},
        }
        for i, item in enumerate(items)
    ]
    acknowledged = time.monotonic()
    assert profile.post("/v1/events", json={"events": events}).status_code == 202
    count_before = sum(item["category"] == category for item in before)
    count_after = count_before
    while time.monotonic() - acknowledged < 1.0:
        after = recommend(client, visitor, context={"device": "mobile", "city": "Jakarta", "now": now.isoformat()})
        count_after = sum(item["category"] == category for item in after["slots"][0]["items"])
        if count_after > count_before:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - acknowledged
    assert count_after > count_before, f"{category}: {count_before} -> {count_after}"
    assert elapsed < 1.0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"visitor_id": "v", "slots": []}, "slots"),
        ({"visitor_id": "v", "slots": [{"name": "a", "count": 500}]}, "slots.0.count"),
        ({"visitor_id": "v", "slots": [{"name": "a"}, {"name": "a"}]}, "(root)"),
        ({"visitor_id": "v", "slots": [{"name": "a", "kind": "message"}]}, "slots.0"),
        ({"slots": [{"name": "a"}]}, "visitor_id"),
    ],
)
def test_invalid_requests_are_422_with_the_field(
    clients: tuple[TestClient, TestClient], payload: dict[str, Any], field: str
) -> None:
    _, client = clients
    response = client.post("/v1/recommend", json=payload)
    assert response.status_code == 422
    assert field in [e["field"] for e in response.json()["errors"]], response.json()


def test_catalog_upsert_validates_by_index(clients: tuple[TestClient, TestClient]) -> None:
    _, client = clients
    good = {"item_id": "new-1", "title": "Sepatu Baru", "category": "sepatu-olahraga", "price": 350000, "stock": 3}
    bad = {"item_id": "new-2", "title": "Tanpa harga", "kind": "product"}
    response = client.put("/v1/catalog/items", json={"items": [good, bad]})
    assert response.status_code == 422
    assert [e["index"] for e in response.json()["errors"]] == [1]
    assert client.put("/v1/catalog/items", json={"items": [good]}).json() == {"upserted": 1}
    too_many = {"items": [good] * 5001}
    assert client.put("/v1/catalog/items", json=too_many).status_code == 413


def test_reload_keeps_serving(clients: tuple[TestClient, TestClient], world: SessionWorld) -> None:
    _, client = clients
    response = client.post("/v1/admin/reload")
    assert response.status_code == 200
    assert response.json()["model_version"] == world.world.model_version
    assert client.get("/readyz").json()["ready"] is True


def test_direct_online_read_equals_the_sdk_read(world: SessionWorld) -> None:
    from services.recommend.repository import RecommendRepository

    repository = RecommendRepository.open(world.settings)
    try:
        # Visitors the world's history folded (a few simulated visitors never came, so they have no row).
        simulated = [visitor.visitor_id for visitor in world.world.simulator.visitors[:20]]
        states = repository.store.get_many(Namespace.VISITOR_STATE, simulated)
        known = [visitor for visitor, state in zip(simulated, states, strict=True) if state is not None][:5]
        assert len(known) == 5
        for visitor_id in known:
            fast = repository.visitor_row(visitor_id)
            slow = repository.visitor_row_via_sdk(visitor_id)
            assert fast is not None and slow is not None
            assert fast.keys() == slow.keys()
            for name in fast:
                assert fast[name] == slow[name] or (fast[name] != fast[name] and slow[name] != slow[name]), name
        assert repository.visitor_row("never-seen") is None
    finally:
        repository.close()


def test_metrics_use_route_templates_and_never_visitor_ids(
    clients: tuple[TestClient, TestClient], world: SessionWorld
) -> None:
    profile, client = clients
    visitor = world.world.simulator.visitors[2].visitor_id
    recommend(client, visitor)
    profile.get(f"/v1/profiles/{visitor}")
    profile_metrics = profile.get("/metrics").text
    recommend_metrics = client.get("/metrics").text
    assert 'route="/v1/profiles/{visitor_id}"' in profile_metrics
    assert 'route="/v1/recommend"' in recommend_metrics
    for text in (profile_metrics, recommend_metrics):
        assert visitor not in text
    for name in (
        "selaras_recommendations_total",
        "selaras_recommend_stage_seconds",
        "selaras_model_loaded_timestamp_seconds",
    ):
        assert name in recommend_metrics
    for name in ("selaras_events_ingested_total", "selaras_feature_write_lag_seconds"):
        assert name in profile_metrics


def test_ranking_in_a_thread_pool_answers_the_same_as_on_the_event_loop(
    clients: tuple[TestClient, TestClient], world: SessionWorld, world_fork: CommonSettings
) -> None:
    _, inline = clients
    threaded_settings = RecommendSettings(**fork_values(world_fork), rank_on_event_loop=False)
    visitor = world.world.simulator.visitors[5].visitor_id
    now = world.world.end.isoformat()
    with TestClient(create_recommend_app(threaded_settings, world.clock)) as threaded:
        answers = [
            recommend(client, visitor, context={"device": "mobile", "city": "Jakarta", "now": now})
            for client in (inline, threaded)
        ]
    ranked = [[[item["item_id"] for item in slot["items"]] for slot in answer["slots"]] for answer in answers]
    assert ranked[0] == ranked[1] and ranked[0][0], ranked
