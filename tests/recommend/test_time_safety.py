"""No events from the future, and a client-chosen `now` only where the caller may choose the time: end to end
on the session's demo world (real Redis, Feast, the trained model, both apps with API keys)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.auth import hash_key
from services.common.settings import CommonSettings
from services.features.aggregations import ItemState, item_features
from services.profile.app import create_app as create_profile_app
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings
from tests.conftest import SessionWorld, unique_name, wait_for
from tests.factories import make_event_dict

BROWSER, SENDER, OPS = "browser-key-1234", "sender-key-5678", "ops-key-9012"
KEYS = f"web:recommend:{hash_key(BROWSER)},shop:ingest:{hash_key(SENDER)},ops:admin:{hash_key(OPS)}"
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)
SLOTS = [{"name": "home", "kind": "product", "count": 8}]


@pytest.fixture(scope="module")
def apps(world: SessionWorld, world_fork: CommonSettings) -> Iterator[tuple[TestClient, TestClient, ProfileRepository]]:
    # On a copy of the world: these tests send events and log impressions, which add visitors and move item
    # statistics (erasing the visitors afterwards left their consent records and the item counts behind).
    common: dict[str, Any] = {
        **world_fork.model_dump(include={"data_dir", "redis_url", "namespace", "feast_project", "environment"}),
        "api_keys": KEYS,
    }
    repository = ProfileRepository.open(ProfileSettings(**common))
    with (
        TestClient(
            # No offline rows: these tests read online state only.
            create_profile_app(ProfileSettings(**common, aggregator_idle_s=0.005, offline_rows=False), world.clock)
        ) as profile,
        TestClient(create_recommend_app(RecommendSettings(**common, refresh_interval_s=0.5), world.clock)) as recommend,
    ):
        yield profile, recommend, repository
    repository.close()


def item_state(repository: ProfileRepository, item_id: str) -> ItemState:
    return repository.item_states([item_id]).get(item_id) or ItemState(item_id)


def ask(client: TestClient, key: str, visitor: str, now: datetime) -> dict[str, Any]:
    body = {"visitor_id": visitor, "context": {"device": "mobile", "now": now.isoformat()}, "slots": SLOTS}
    response = client.post("/v1/recommend", json=body, headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_a_future_event_is_refused_by_index_and_field_and_nothing_is_stored(
    apps: tuple[TestClient, TestClient, ProfileRepository], world: SessionWorld
) -> None:
    profile, _, repository = apps
    item_id = world.world.shop.products[0].item_id
    before = item_state(repository, item_id)
    visitor = unique_name("future")
    now = world.clock.now_datetime()
    events = [
        make_event_dict(visitor_id=visitor, item_id=item_id, timestamp=now.isoformat()),
        make_event_dict(visitor_id=visitor, item_id=item_id, timestamp=FAR_FUTURE.isoformat()),
    ]
    response = profile.post("/v1/events", json={"events": events}, headers={"X-API-Key": SENDER})
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(1, "timestamp")]
    assert "ahead of the service clock" in errors[0]["message"]
    # Nothing of the batch was stored: the valid event can be re-sent on its own and is new.
    again = profile.post("/v1/events", json={"events": events[:1]}, headers={"X-API-Key": SENDER})
    assert again.json() == {"accepted": 1, "duplicates": 0}
    assert wait_for(lambda: item_state(repository, item_id).buckets.get("views") != before.buckets.get("views"), 20.0)
    after = item_state(repository, item_id)
    assert after.last_ts <= world.clock.now() + 300
    at = world.clock.now()
    assert item_features(after, at)["views_7d"] == item_features(before, at)["views_7d"] + 1


def test_a_browser_key_cannot_choose_the_time_and_its_impressions_do_not_move_item_time(
    apps: tuple[TestClient, TestClient, ProfileRepository], world: SessionWorld
) -> None:
    _, recommend, repository = apps
    visitor = unique_name("browser")
    answer = ask(recommend, BROWSER, visitor, FAR_FUTURE)
    assert answer["time"]["source"] == "clock" and "ignored" in answer["time"]
    used = datetime.fromisoformat(answer["time"]["now"])
    assert abs(used.timestamp() - world.clock.now()) < 60
    shown = [item["item_id"] for item in answer["slots"][0]["items"]]
    assert shown and not answer["fallback"]
    before = {item_id: item_state(repository, item_id) for item_id in shown}

    def impressions(state: ItemState) -> int:
        return sum((state.buckets.get("impressions") or {}).values())

    # The impressions are logged (at the clock's time) and folded: counts move, item time does not jump.
    assert wait_for(
        lambda: all(impressions(item_state(repository, i)) > impressions(before[i]) for i in shown), timeout=30
    )
    at = world.clock.now()
    for item_id in shown:
        after = item_state(repository, item_id)
        assert after.last_ts <= world.clock.now() + 300, item_id
        for window in ("views_7d", "purchases_30d", "carts_7d"):
            assert item_features(after, at)[window] == item_features(before[item_id], at)[window], (item_id, window)


def test_an_admin_key_chooses_the_time(
    apps: tuple[TestClient, TestClient, ProfileRepository], world: SessionWorld
) -> None:
    _, recommend, _ = apps
    visitor = unique_name("admin")
    asked = world.clock.now_datetime() - timedelta(days=3)
    answer = ask(recommend, OPS, visitor, asked)
    assert answer["time"]["source"] == "request" and "ignored" not in answer["time"]
    assert abs(datetime.fromisoformat(answer["time"]["now"]).timestamp() - asked.timestamp()) < 0.01
    # The browser key asking for the same time gets the clock instead.
    assert ask(recommend, BROWSER, visitor, asked)["time"]["source"] == "clock"
