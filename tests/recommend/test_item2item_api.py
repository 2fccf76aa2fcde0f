"""Item-to-item slots, GET /v1/items/{item_id}/similar and the rerank slot, through the API on real Redis with
the world's trained LightGBM model: anchors never come back, known visitors are re-ranked by the model,
unknown visitors get the neighbour order, and the rerank slot obeys the rules every slot obeys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.settings import CommonSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.ranking.item2item import neighbours
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from tests.conftest import SessionWorld, wait_for


@pytest.fixture(scope="module")
def client(world: SessionWorld, world_fork: CommonSettings) -> Iterator[TestClient]:
    # On a copy of the world: every answer logs its impressions, which would become events (and visitors) of
    # the world that later tests count.
    settings = RecommendSettings(
        **world_fork.model_dump(include={"data_dir", "redis_url", "namespace", "feast_project", "environment"}),
    )
    with TestClient(create_recommend_app(settings, world.clock)) as recommend_client:
        yield recommend_client


def service_of(client: TestClient) -> RecommendService:
    service: RecommendService = client.app.state.recommend.service  # type: ignore[attr-defined]
    return service


def anchor_with_neighbours(client: TestClient, minimum: int = 15) -> str:
    """A product with at least `minimum` available co-visited neighbours."""
    snapshot = service_of(client).snapshot
    for row in snapshot.popular.tolist():
        if len(neighbours(snapshot, [row], "bought_together", snapshot.available.copy())) >= minimum:
            return snapshot.ids[row]
    raise AssertionError("no product with enough co-visited neighbours in the world")


def post(client: TestClient, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = client.post("/v1/recommend", json=body)
    assert response.status_code == status, response.text
    answer: dict[str, Any] = response.json()
    return answer


def ids_of(slot: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in slot["items"]]


@pytest.mark.parametrize("strategy", ["similar", "bought_together"])
def test_an_unknown_visitor_gets_the_neighbour_order_without_the_anchor(client: TestClient, strategy: str) -> None:
    anchor = anchor_with_neighbours(client)
    body = post(
        client,
        {
            "visitor_id": "nobody-seen-before",
            "context": {"item_ids": [anchor]},
            "slots": [{"name": "pdp", "strategy": strategy, "count": 8}],
            "explain": True,
        },
    )
    (slot,) = body["slots"]
    assert slot["strategy"] == strategy and body["strategy"] == "popular_in_context"
    assert anchor not in ids_of(slot) and len(slot["items"]) == 8
    # Items the merchandiser did not boost or pin keep the anchor's neighbour order (the public endpoint reads
    # the same list); boosts and pins apply as in every slot.
    snapshot = service_of(client).snapshot
    similar = client.get(f"/v1/items/{anchor}/similar", params={"strategy": strategy, "limit": 100}).json()
    listed = [item["item_id"] for item in similar["items"]]
    plain = [
        i for i in ids_of(slot) if snapshot.log_boost[snapshot.index[i]] == 0 and not snapshot.pinned[snapshot.index[i]]
    ]
    assert len(plain) >= 3 and set(plain) <= set(listed)
    assert plain == [item for item in listed if item in plain]
    title = snapshot.titles[snapshot.index[anchor]]
    phrase = "similar to" if strategy == "similar" else "often bought together with"
    assert all(item["reasons"] == [f"{phrase} {title}"] for item in slot["items"]), slot["items"][:2]


def test_a_known_visitor_gets_the_anchor_neighbours_reranked_by_the_model(
    client: TestClient, world: SessionWorld
) -> None:
    anchor = anchor_with_neighbours(client)
    visitor = world.world.simulator.visitors[0].visitor_id
    slot_request = {"name": "pdp", "strategy": "bought_together", "count": 10}
    known = post(client, {"visitor_id": visitor, "context": {"item_ids": [anchor]}, "slots": [slot_request]})
    anonymous = post(client, {"visitor_id": "nobody-2", "context": {"item_ids": [anchor]}, "slots": [slot_request]})
    assert known["strategy"] == "personalized" and known["model_version"] is not None
    snapshot = service_of(client).snapshot
    pool = {snapshot.ids[i] for i in neighbours(snapshot, [snapshot.index[anchor]], "bought_together").idx}
    mine, generic = ids_of(known["slots"][0]), ids_of(anonymous["slots"][0])
    assert anchor not in mine and set(mine) <= pool
    # Scores are the model's (not the neighbour order's evenly spaced ones), and the order is the visitor's own.
    assert mine != generic
    scores = [
        item["score"] for item in known["slots"][0]["items"] if not snapshot.pinned[snapshot.index[item["item_id"]]]
    ]
    assert len(set(scores)) > 1 and scores == sorted(scores, reverse=True)  # pinned items (first) aside


def test_explanations_never_name_the_item_itself(client: TestClient, world: SessionWorld) -> None:
    anchor = anchor_with_neighbours(client)
    snapshot = service_of(client).snapshot
    for visitor in (world.world.simulator.visitors[0].visitor_id, "nobody-3"):
        body = post(
            client,
            {
                "visitor_id": visitor,
                "context": {"item_ids": [anchor]},
                "slots": [{"name": "home", "count": 10}, {"name": "pdp", "strategy": "bought_together"}],
                "explain": True,
            },
        )
        for slot in body["slots"]:
            for item in slot["items"]:
                own_title = snapshot.titles[snapshot.index[item["item_id"]]]
                assert not any(reason.endswith(f" {own_title}") for reason in item["reasons"]), item


def test_unknown_or_missing_anchors_are_422_naming_the_field(client: TestClient) -> None:
    anchor = anchor_with_neighbours(client)
    slots = [{"name": "pdp", "strategy": "similar"}]
    unknown = post(client, {"visitor_id": "v", "context": {"item_ids": [anchor, "no-such-item"]}, "slots": slots}, 422)
    assert unknown["error"] == "InvalidPayload"
    assert [e["field"] for e in unknown["errors"]] == ["context.item_ids.1"]
    missing = post(client, {"visitor_id": "v", "slots": slots}, 422)
    assert [e["field"] for e in missing["errors"]] == ["context.item_ids"]
    banner = post(
        client, {"visitor_id": "v", "context": {"item_ids": [anchor]}, "slots": [{**slots[0], "kind": "banner"}]}, 422
    )
    assert "slots.0.strategy" in [e["field"] for e in banner["errors"]]


def test_similar_items_endpoint(client: TestClient) -> None:
    anchor = anchor_with_neighbours(client)
    for strategy in ("similar", "bought_together"):
        response = client.get(f"/v1/items/{anchor}/similar", params={"strategy": strategy, "limit": 7})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["item_id"] == anchor and body["strategy"] == strategy
        items = [item["item_id"] for item in body["items"]]
        assert len(items) == 7 and anchor not in items and len(set(items)) == 7
    missing = client.get("/v1/items/no-such-item/similar")
    assert missing.status_code == 404 and missing.json()["error"] == "NotFound"
    for params, field in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"strategy": "cheaper"}, "strategy")):
        bad = client.get(f"/v1/items/{anchor}/similar", params=params)
        assert bad.status_code == 422, bad.text
        assert any(e["field"].endswith(field) for e in bad.json()["errors"]), bad.json()


def rerank_slot(candidate_ids: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": "search", "strategy": "rerank", "candidate_ids": candidate_ids, **extra}


def test_rerank_returns_the_given_items_personalised_and_logs_them(client: TestClient, world: SessionWorld) -> None:
    snapshot = service_of(client).snapshot
    given = [snapshot.ids[i] for i in snapshot.popular[50:90].tolist()]
    visitor = world.world.simulator.visitors[2].visitor_id
    body = post(
        client,
        {
            "visitor_id": visitor,
            "slots": [rerank_slot([*given, "not-in-catalog-1", "not-in-catalog-2"], count=12)],
            "explain": True,
        },
    )
    (slot,) = body["slots"]
    assert slot["strategy"] == "rerank" and slot["unknown_candidates"] == 2
    assert len(slot["items"]) == 12 and set(ids_of(slot)) <= set(given)
    assert body["strategy"] == "personalized" and all(item["reasons"] for item in slot["items"])
    assert ids_of(slot) != given[:12]  # the visitor's order, not the shop's
    repository = client.app.state.recommend.repository  # type: ignore[attr-defined]
    assert wait_for(lambda: repository.recommendation(body["recommendation_id"]) is not None)
    assert repository.recommendation(body["recommendation_id"])["slots"]["search"] == ids_of(slot)
    # An unknown visitor keeps the shop's order (boosts and pins apply, as in every slot).
    anonymous = ids_of(post(client, {"visitor_id": "nobody-4", "slots": [rerank_slot(given, count=12)]})["slots"][0])
    plain = [
        i for i in anonymous if snapshot.log_boost[snapshot.index[i]] == 0 and not snapshot.pinned[snapshot.index[i]]
    ]
    assert len(plain) >= 3 and plain == [i for i in given if i in plain]


def test_rerank_obeys_the_rules_of_every_slot(client: TestClient, world: SessionWorld) -> None:
    snapshot = service_of(client).snapshot
    visitor = world.world.simulator.visitors[3].visitor_id
    first = post(client, {"visitor_id": visitor, "slots": [{"name": "home", "count": 10}]})
    home = ids_of(first["slots"][0])
    given = home + [snapshot.ids[i] for i in snapshot.popular[100:160].tolist() if snapshot.ids[i] not in home]
    excluded = given[-1]
    body = post(
        client,
        {
            "visitor_id": visitor,
            "slots": [
                {"name": "home", "count": 10},
                rerank_slot(given, count=40, max_per_category=2, filters={"exclude_items": [excluded]}),
            ],
        },
    )
    personal, reranked = (ids_of(slot) for slot in body["slots"])
    assert personal == home
    assert not set(reranked) & set(home)  # no repeats across slots
    assert excluded not in reranked  # filters
    categories = [snapshot.categories[snapshot.index[i]] for i in reranked]
    assert max(categories.count(c) for c in set(categories)) <= 2  # the quota it asked for
    bought = set(service_of(client).repository.visitor_row(visitor).get("purchased_items") or ())
    assert not bought & set(reranked)  # just bought is not offered again


@pytest.mark.parametrize(
    ("candidate_ids", "field"),
    [
        ([], "slots.0.candidate_ids"),
        ([f"i{n}" for n in range(1001)], "slots.0.candidate_ids"),
        (None, "slots.0.candidate_ids"),
    ],
)
def test_bad_candidate_lists_are_422_naming_the_field(
    client: TestClient, candidate_ids: list[str] | None, field: str
) -> None:
    slot: dict[str, Any] = {"name": "search", "strategy": "rerank"}
    if candidate_ids is not None:
        slot["candidate_ids"] = candidate_ids
    body = post(client, {"visitor_id": "v", "slots": [slot]}, 422)
    assert field in [e["field"] for e in body["errors"]], body
    wrong_slot = post(client, {"visitor_id": "v", "slots": [{"name": "home", "candidate_ids": ["a"]}]}, 422)
    assert "slots.0.candidate_ids" in [e["field"] for e in wrong_slot["errors"]]


def test_impressions_of_item_to_item_and_rerank_slots_say_their_strategy() -> None:
    from services.recommend.answers import impression_event
    from services.recommend.schemas import RecommendRequest

    request = RecommendRequest.model_validate(
        {
            "visitor_id": "v",
            "context": {"item_ids": ["a"]},
            "slots": [{"name": "home"}, {"name": "pdp", "strategy": "similar"}, rerank_slot(["a", "b"])],
        }
    )
    strategies = [
        impression_event(request, "r1", slot, "x", 0, 1.0, 1.0, 0.0, None)["properties"].get("strategy")
        for slot in request.slots
    ]
    assert strategies == [None, "similar", "rerank"]
