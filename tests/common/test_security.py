"""API security through both real apps: 401/403 by scope, per-key rate limits shared through Redis (429 +
Retry-After), CORS preflights, and 413 for oversized bodies with and without Content-Length."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from services.common.auth import hash_key
from services.common.ratelimit import Limit, MemoryRateLimiter, RedisRateLimiter, parse_limits
from services.common.security import install_security
from services.common.settings import CommonSettings
from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.service import GENERIC_REASON
from services.recommend.settings import RecommendSettings
from tests.conftest import REDIS_URL, clean_namespace, unique_name
from tests.factories import make_event_dict, make_item

ORIGIN = "https://toko.example"
KEYS = {
    "web": ("recommend", "pk_web_secret_0123456789"),
    "sender": ("ingest", "sk_sender_secret_0123456789"),
    "ops": ("admin", "sk_ops_secret_0123456789"),
    "limited": ("recommend+ingest", "sk_limited_secret_0123456789"),
    "collector": ("collect", "pk_collector_secret_0123456789"),
    "crm": ("messages", "sk_crm_secret_0123456789"),
}
API_KEYS = ",".join(f"{name}:{scopes}:{hash_key(secret)}" for name, (scopes, secret) in KEYS.items())
MAX_REQUEST_BYTES = 8192


def key(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name][1]}


@dataclass
class Apps:
    profile: TestClient
    recommend: TestClient
    namespace: str


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apps]:
    namespace = unique_name("sec")
    shared = {
        "data_dir": tmp_path_factory.mktemp("security"),
        "redis_url": REDIS_URL,
        "namespace": namespace,
        "feast_project": namespace,
        "environment": "test",
        "api_keys": API_KEYS,
        # Only "limited" has a small bucket: 2 requests at once, then 2 per second.
        "rate_limits": "limited=2/2",
        "cors_origins": ORIGIN,
        "max_request_bytes": MAX_REQUEST_BYTES,
    }
    profile = create_profile_app(ProfileSettings(**shared, aggregator_idle_s=0.05))
    recommend = create_recommend_app(RecommendSettings(**shared, refresh_interval_s=30))
    with TestClient(profile) as profile_client, TestClient(recommend) as recommend_client:
        yield Apps(profile_client, recommend_client, namespace)
    clean_namespace(REDIS_URL, namespace)
    shutil.rmtree(Path(shared["data_dir"]), ignore_errors=True)


def events_body(n: int = 1) -> dict[str, object]:
    return {"events": [make_event_dict(visitor_id="sec-visitor") for _ in range(n)]}


RECOMMEND_BODY = {"visitor_id": "sec-visitor", "slots": [{"name": "home", "kind": "product", "count": 3}]}


def assert_error(response: object, status: int, name: str) -> None:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["error"] == name and body["detail"]


# ------------------------------------------------------------------------------------------------- 401 / 403


def test_missing_or_unknown_key_gets_401_on_both_apps(apps: Apps) -> None:
    assert_error(apps.profile.post("/v1/events", json=events_body()), 401, "Unauthorized")
    assert_error(apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY), 401, "Unauthorized")
    wrong = {"X-API-Key": "sk_not_a_key"}
    response = apps.profile.post("/v1/events", json=events_body(), headers=wrong)
    assert_error(response, 401, "Unauthorized")
    assert "unknown" in response.json()["detail"]


def test_wrong_scope_gets_403_and_right_scope_passes(apps: Apps) -> None:
    # A browser key may only read recommendations.
    response = apps.profile.post("/v1/events", json=events_body(), headers=key("web"))
    assert_error(response, 403, "Forbidden")
    assert "ingest" in response.json()["detail"]
    assert_error(apps.profile.get("/v1/profiles/sec-visitor", headers=key("web")), 403, "Forbidden")
    assert_error(apps.profile.delete("/v1/profiles/sec-visitor", headers=key("sender")), 403, "Forbidden")
    assert_error(apps.recommend.put("/v1/catalog/items", json={"items": []}, headers=key("web")), 403, "Forbidden")
    assert_error(apps.recommend.post("/v1/admin/reload", headers=key("sender")), 403, "Forbidden")
    # An event sender cannot read recommendations (it is not a front end).
    assert_error(apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers=key("sender")), 403, "Forbidden")

    assert apps.profile.post("/v1/events", json=events_body(), headers=key("sender")).status_code == 202
    assert apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers=key("web")).status_code == 200
    # admin includes the other scopes; the key also works as a bearer token.
    bearer = {"Authorization": f"Bearer {KEYS['ops'][1]}"}
    assert apps.profile.post("/v1/events", json=events_body(), headers=bearer).status_code == 202
    assert apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers=key("ops")).status_code == 200


def test_collect_key_sends_behaviour_of_one_visitor_only(apps: Apps) -> None:
    def post(*events: dict[str, object]) -> Any:
        return apps.profile.post("/v1/events", json={"events": list(events)}, headers=key("collector"))

    def event(kind: str = "product_view", visitor: str = "sec-browser", **extra: object) -> dict[str, object]:
        return make_event_dict(visitor_id=visitor, type=kind, **extra)

    assert (
        post(event(), event("add_to_cart"), event("search", item_id=None, price=None, query="tas")).status_code == 202
    )
    purchase = post(event(), event("purchase"))
    assert_error(purchase, 403, "Forbidden")
    assert purchase.json()["errors"] == [
        {"index": 1, "field": "type", "message": "a collect key may not send purchase events"}
    ]
    update = event("profile_update", item_id=None, price=None, properties={"consent_personalization": True})
    assert_error(post(update), 403, "Forbidden")  # consent and traits come from the shop's servers
    assert_error(post(event(), event(visitor="someone-else")), 403, "Forbidden")  # one visitor per request
    consent = apps.profile.put("/v1/profiles/sec-browser/consent", json={"analytics": True}, headers=key("collector"))
    assert_error(consent, 403, "Forbidden")
    # The collect key reads nothing either.
    assert_error(apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers=key("collector")), 403, "Forbidden")
    # A server key (ingest) may send all of it.
    assert (
        apps.profile.post("/v1/events", json={"events": [event("purchase")]}, headers=key("sender")).status_code == 202
    )


def test_messages_need_the_server_side_messages_scope(apps: Apps) -> None:
    body = {"visitor_id": "sec-visitor", "channel": "push", "dry_run": True}
    for path, payload in (("/v1/next-best-message", body), ("/v1/next-best-message:batch", {"requests": [body]})):
        assert_error(apps.recommend.post(path, json=payload, headers=key("web")), 403, "Forbidden")  # browser key
        assert apps.recommend.post(path, json=payload, headers=key("crm")).status_code == 200
        assert apps.recommend.post(path, json=payload, headers=key("ops")).status_code == 200


def test_a_browser_key_gets_no_behavioural_explanations(apps: Apps) -> None:
    apps.recommend.put(
        "/v1/catalog/items",
        json={"items": [make_item(item_id=f"sec-{i}").model_dump(mode="json") for i in range(5)]},
        headers=key("ops"),
    )
    assert apps.recommend.post("/v1/admin/reload", headers=key("ops")).status_code == 200
    body = {**RECOMMEND_BODY, "explain": True}
    browser = apps.recommend.post("/v1/recommend", json=body, headers=key("web")).json()
    server = apps.recommend.post("/v1/recommend", json=body, headers=key("ops")).json()
    browser_items, server_items = browser["slots"][0]["items"], server["slots"][0]["items"]
    assert browser_items and all(item["reasons"] == [GENERIC_REASON] for item in browser_items)
    assert server_items and all(item["reasons"] != [GENERIC_REASON] for item in server_items)


# ------------------------------------------------------------------------------------------------- 429


def test_rate_limit_gives_429_with_retry_after_shared_across_apps(apps: Apps) -> None:
    time.sleep(1.1)  # a full bucket, whatever ran before
    statuses = [
        apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers=key("limited")).status_code for _ in range(2)
    ]
    assert statuses == [200, 200]
    refused = apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers=key("limited"))
    assert_error(refused, 429, "RateLimited")
    assert refused.headers["retry-after"] == "1"
    # The bucket lives in Redis: the other app (another process in production) sees it empty too.
    assert_error(apps.profile.post("/v1/events", json=events_body(), headers=key("limited")), 429, "RateLimited")
    # Other keys have their own buckets (the default limit is far away).
    assert apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers=key("web")).status_code == 200
    # Health checks are never limited.
    assert apps.recommend.get("/healthz", headers=key("limited")).status_code == 200
    # After Retry-After the key works again.
    time.sleep(float(refused.headers["retry-after"]))
    assert apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers=key("limited")).status_code == 200


def test_redis_buckets_refill_at_the_configured_rate(apps: Apps) -> None:
    limiter = RedisRateLimiter(REDIS_URL, apps.namespace)
    limit = Limit(rate=5.0, burst=3)

    async def run() -> list[float]:
        waits = [await limiter.acquire("refill", limit) for _ in range(5)]
        await limiter.close()
        return waits

    waits = asyncio.run(run())
    assert waits[:3] == [0.0, 0.0, 0.0]
    # Refused requests do not consume tokens: both wait about one interval (0.2 s) for the next token.
    assert 0.1 < waits[3] <= 0.2 and 0.1 < waits[4] <= 0.2


def test_redis_outage_lets_requests_through() -> None:
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0", "nowhere", timeout_s=0.2)

    async def run() -> float:
        return await limiter.acquire("any", Limit(1.0, 1))

    assert asyncio.run(run()) == 0.0


def test_memory_limiter_bucket_arithmetic() -> None:
    limiter = MemoryRateLimiter()
    limit = Limit(rate=10.0, burst=2)
    assert limiter.acquire_at("k", limit, 100.0) == 0.0
    assert limiter.acquire_at("k", limit, 100.0) == 0.0
    assert limiter.acquire_at("k", limit, 100.0) == pytest.approx(0.1)
    assert limiter.acquire_at("k", limit, 100.1) == 0.0  # one token back after 1/rate
    assert limiter.acquire_at("other", limit, 100.1) == 0.0  # buckets are independent
    assert limiter.acquire_at("k", limit, 105.0) == 0.0  # a long pause refills only up to the burst
    assert limiter.acquire_at("k", limit, 105.0) == 0.0
    assert limiter.acquire_at("k", limit, 105.0) > 0


def test_rate_limit_spec_parsing() -> None:
    assert parse_limits("web=200/400, crm=5") == {"web": Limit(200.0, 400), "crm": Limit(5.0, 5)}
    for bad in ("web=0/1", "=5/5", "web=fast", "web=5/0"):
        with pytest.raises(ValueError):
            parse_limits(bad)


def test_in_process_limits_without_redis_and_anonymous_development(tmp_path: Path) -> None:
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, bool]:
        return {"ok": True}

    settings = CommonSettings(data_dir=tmp_path, rate_limits="anonymous=1/1", environment="test")
    install_security(app, settings)
    with TestClient(app) as client:
        assert client.get("/ping").status_code == 200
        refused = client.get("/ping")
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1

    # Without keys and without an "anonymous" entry, development requests are not limited.
    open_app = FastAPI()
    open_app.get("/ping")(ping)
    install_security(open_app, CommonSettings(data_dir=tmp_path, rate_limit_per_s=1, rate_limit_burst=1))
    with TestClient(open_app) as client:
        assert all(client.get("/ping").status_code == 200 for _ in range(5))


def test_a_browser_key_is_limited_per_client(tmp_path: Path) -> None:
    """The public key is shared by every browser: each client has its own bucket, so one client cannot drain
    the shop's limit. A server key has one bucket whatever the client."""
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, bool]:
        return {"ok": True}

    settings = CommonSettings(
        data_dir=tmp_path, api_keys=API_KEYS, rate_limits="web=1/1,sender=1/1", environment="test"
    )
    install_security(app, settings)
    one, other = TestClient(app, client=("203.0.113.1", 1000)), TestClient(app, client=("203.0.113.2", 1000))
    assert one.get("/ping", headers=key("web")).status_code == 200
    assert one.get("/ping", headers=key("web")).status_code == 429  # this client's bucket is empty ...
    assert other.get("/ping", headers=key("web")).status_code == 200  # ... the next browser's is not
    assert one.get("/ping", headers=key("sender")).status_code == 200
    assert other.get("/ping", headers=key("sender")).status_code == 429  # a server key: one bucket


# ------------------------------------------------------------------------------------------------- CORS


def test_cors_preflight_allows_the_configured_origin_only(apps: Apps) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-api-key",
    }
    for client, path in ((apps.recommend, "/v1/recommend"), (apps.profile, "/v1/events")):
        response = client.options(path, headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "x-api-key" in response.headers["access-control-allow-headers"].lower()
        assert "POST" in response.headers["access-control-allow-methods"]
    refused = apps.recommend.options("/v1/recommend", headers={**preflight, "Origin": "https://evil.example"})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    # A real cross-origin call gets the header, and Retry-After is readable by the browser.
    response = apps.recommend.post("/v1/recommend", json=RECOMMEND_BODY, headers={**key("web"), "Origin": ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()


# ------------------------------------------------------------------------------------------------- 413


def test_oversized_bodies_get_413_with_or_without_content_length(apps: Apps) -> None:
    big = b'{"events": [' + b" " * (MAX_REQUEST_BYTES + 10) + b"]}"
    declared = apps.profile.post(
        "/v1/events", content=big, headers={**key("sender"), "content-type": "application/json"}
    )
    assert_error(declared, 413, "PayloadTooLarge")

    def chunks(total: int) -> Iterator[bytes]:
        yield b'{"events": ['
        for _ in range(total // 1024):
            yield b" " * 1024
        yield b"]}"

    streamed = apps.recommend.post("/v1/recommend", content=chunks(MAX_REQUEST_BYTES * 2), headers=key("web"))
    assert "content-length" not in streamed.request.headers
    assert_error(streamed, 413, "PayloadTooLarge")
    # A chunked body under the limit is read and processed normally.
    small = b'{"events": [' + make_event_json() + b"]}"

    def small_chunks() -> Iterator[bytes]:
        yield small[:10]
        yield small[10:]

    accepted = apps.profile.post("/v1/events", content=small_chunks(), headers=key("sender"))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"accepted": 1, "duplicates": 0}


def make_event_json() -> bytes:
    return orjson.dumps(make_event_dict(visitor_id="sec-visitor"))


def test_requests_without_a_server_key_get_the_small_body_limit(tmp_path: Path) -> None:
    """A browser key, an unknown key or none: the small limit applies before the body is read (the public key
    must not make the service buffer large bodies); a server key gets the large one."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    settings = CommonSettings(
        data_dir=tmp_path,
        api_keys=API_KEYS,
        max_request_bytes=64 * 1024,
        max_browser_request_bytes=4 * 1024,
        environment="test",
    )
    install_security(app, settings)
    body = b"x" * (8 * 1024)

    def streamed() -> Iterator[bytes]:
        yield body[:4000]
        yield body[4000:]

    with TestClient(app) as client:
        for headers in (key("web"), key("collector"), {"X-API-Key": "sk_unknown"}, {}):
            assert_error(client.post("/echo", content=body, headers=headers), 413, "PayloadTooLarge")
            assert_error(client.post("/echo", content=streamed(), headers=headers), 413, "PayloadTooLarge")
        for name in ("sender", "crm", "ops", "limited"):
            assert client.post("/echo", content=body, headers=key(name)).json() == {"bytes": len(body)}
        assert client.post("/echo", content=body[:4000], headers=key("web")).json() == {"bytes": 4000}
