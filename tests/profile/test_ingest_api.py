"""POST /v1/events on real Redis: acknowledgement, idempotency, and every refusal status."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.auth import hash_key
from services.profile.app import create_app
from services.profile.settings import ProfileSettings
from tests.conftest import RedisServer, wait_for
from tests.factories import make_event_dict


def features(client: TestClient, visitor: str) -> dict[str, Any] | None:
    response = client.get(f"/v1/profiles/{visitor}")
    return response.json()["features"] if response.status_code == 200 else None


def test_batch_is_acknowledged_and_folded(profile_settings: ProfileSettings) -> None:
    with TestClient(create_app(profile_settings)) as client:
        events = [make_event_dict(visitor_id="alice", item_id=f"p{i}") for i in range(5)]
        response = client.post("/v1/events", json={"events": events})
        assert response.status_code == 202
        assert response.json() == {"accepted": 5, "duplicates": 0}
        assert wait_for(lambda: (features(client, "alice") or {}).get("views_30d") == 5)


def test_resend_counts_duplicates_and_leaves_features_unchanged(profile_settings: ProfileSettings) -> None:
    with TestClient(create_app(profile_settings)) as client:
        events = [make_event_dict(visitor_id="bob", type="add_to_cart", item_id=f"p{i}", price=1000) for i in range(3)]
        assert client.post("/v1/events", json={"events": events}).json() == {"accepted": 3, "duplicates": 0}
        assert wait_for(lambda: (features(client, "bob") or {}).get("carts_30d") == 3)
        before = features(client, "bob")
        again = client.post("/v1/events", json={"events": events})
        assert again.status_code == 202 and again.json() == {"accepted": 0, "duplicates": 3}
        time.sleep(0.3)  # give the aggregator the chance to (wrongly) fold them again
        assert features(client, "bob") == before


def test_oversize_batch_is_413(profile_settings: ProfileSettings) -> None:
    with TestClient(create_app(profile_settings)) as client:
        events = [make_event_dict() for _ in range(profile_settings.max_batch_events + 1)]
        response = client.post("/v1/events", json={"events": events})
        assert response.status_code == 413
        assert response.json()["error"] == "PayloadTooLarge"


def test_invalid_events_are_422_by_index_and_field_and_nothing_is_stored(profile_settings: ProfileSettings) -> None:
    with TestClient(create_app(profile_settings)) as client:
        events = [
            make_event_dict(visitor_id="carol"),
            make_event_dict(visitor_id="carol", timestamp="yesterday"),
            make_event_dict(visitor_id="carol", type="purchase", item_id=None),
            make_event_dict(visitor_id="carol", type="teleport"),
        ]
        response = client.post("/v1/events", json={"events": events})
        assert response.status_code == 422
        errors = response.json()["errors"]
        assert {(e["index"], e["field"]) for e in errors} >= {(1, "timestamp"), (3, "type")}
        assert any(e["index"] == 2 and "item_id" in e["message"] for e in errors)
        assert all(e["index"] != 0 for e in errors)
        time.sleep(0.2)
        assert client.get("/v1/profiles/carol").status_code == 404
        assert client.post("/v1/events", json={"events": []}).status_code == 422
        assert client.post("/v1/events", content=b"{not json").status_code == 422


def test_unknown_visitor_is_404(profile_settings: ProfileSettings) -> None:
    with TestClient(create_app(profile_settings)) as client:
        response = client.get("/v1/profiles/nobody")
        assert response.status_code == 404
        assert response.json() == {"error": "NotFound", "detail": "unknown visitor"}


def test_storage_down_is_503_and_nothing_is_acknowledged(
    redis_server: RedisServer, settings_factory: Callable[..., Any]
) -> None:
    settings = settings_factory(ProfileSettings, redis_url=redis_server.url)
    with TestClient(create_app(settings)) as client:
        ok = client.post("/v1/events", json={"events": [make_event_dict(event_id="kept")]})
        assert ok.status_code == 202
        redis_server.stop()
        refused = client.post("/v1/events", json={"events": [make_event_dict(event_id="refused")]})
        assert refused.status_code == 503
        assert refused.json()["error"] == "StorageUnavailable"
        assert client.get("/readyz").status_code == 503
        redis_server.start()  # AOF on: the acknowledged event survived the restart
        retry = client.post(
            "/v1/events", json={"events": [make_event_dict(event_id="refused"), make_event_dict(event_id="kept")]}
        )
        assert retry.status_code == 202 and retry.json() == {"accepted": 1, "duplicates": 1}


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), ("wrong", 401), ("reader-secret", 403), ("sender-secret", 202)]
)
def test_api_keys_and_scopes(settings_factory: Callable[..., Any], key: str | None, status: int) -> None:
    keys = f"reader:recommend:{hash_key('reader-secret')},sender:ingest:{hash_key('sender-secret')}"
    settings = settings_factory(ProfileSettings, api_keys=keys)
    with TestClient(create_app(settings)) as client:
        headers = {"X-API-Key": key} if key else {}
        response = client.post("/v1/events", json={"events": [make_event_dict()]}, headers=headers)
        assert response.status_code == status
        if status != 202:
            assert response.json()["error"] in ("Unauthorized", "Forbidden")
