"""Schemathesis fuzzes both OpenAPI specs against the real apps (ASGI, real Redis and Feast), with auth on:
never a 5xx, and never a success for a key whose scopes the route does not allow (the allow-list of
tests/common/test_route_scopes.py).

The recommend service serves a copy of the session world (catalog, item statistics, model) in its own
namespace, so the fuzzer reaches the model path and may write (catalog upserts, reloads) without touching the
world other tests read. A bounded number of examples per operation keeps the run under a minute.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.openapi import from_asgi
from schemathesis.python import asgi

from services.common.auth import SCOPES, hash_key
from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings
from tests.common.test_route_scopes import EXPECTED
from tests.conftest import REDIS_URL, SessionWorld, clean_namespace, copy_keys, unique_name

FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# One key per scope: the fuzzer calls every operation with each of them.
KEYS: dict[str, str] = {scope: f"fuzz-{scope}-secret" for scope in sorted(SCOPES)}
API_KEYS = ",".join(f"{scope}-key:{scope}:{hash_key(secret)}" for scope, secret in KEYS.items())
SCOPED_EXAMPLES = 4  # per operation and non-admin key: enough to hit the scope check with valid and bad input


def copy_world(world: SessionWorld, namespace: str) -> int:
    """The session world's serving keys under another namespace and Feast project, in the same Redis."""
    client = redis.Redis.from_url(world.settings.redis_url or REDIS_URL)
    old_ns, old_project = world.settings.namespace, world.settings.feast_project
    copied = 0
    renames: list[tuple[str, Callable[[bytes], bytes]]] = [
        (f"{old_ns}:*", lambda key: namespace.encode() + key[len(old_ns) :]),
        (f"*{old_project}", lambda key: key[: -len(old_project)] + namespace.encode()),
    ]
    for pattern, rename in renames:
        copied += copy_keys(client, client, pattern, rename)
    client.close()
    return copied


def started(app: FastAPI) -> Any:
    """The app's spec loaded through ASGI; loading also runs the app's lifespan (once, kept by schemathesis)."""
    schema = from_asgi("/openapi.json", app)
    ready = asgi.get_client(app).get("/readyz")
    assert ready.status_code == 200, ready.text
    return schema


@pytest.fixture(scope="module")
def recommend_app(world: SessionWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    namespace = unique_name("z")
    assert copy_world(world, namespace) > 1000
    config = RecommendSettings(
        data_dir=tmp_path_factory.mktemp("fuzz-recommend"),
        redis_url=world.settings.redis_url,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        api_keys=API_KEYS,
        rate_limit_per_s=0,
    )
    app = create_recommend_app(config)
    try:
        started(app)
        yield app
    finally:
        asgi.shutdown_lifespans()
        clean_namespace(config.redis_url or REDIS_URL, namespace)


@pytest.fixture(scope="module")
def profile_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    namespace = unique_name("y")
    config = ProfileSettings(
        data_dir=tmp_path_factory.mktemp("fuzz-profile"),
        redis_url=REDIS_URL,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        aggregator_idle_s=0.01,
        api_keys=API_KEYS,
        rate_limit_per_s=0,
    )
    app = create_profile_app(config)
    try:
        started(app)
        yield app
    finally:
        asgi.shutdown_lifespans()
        clean_namespace(REDIS_URL, namespace)


# Operations whose every call walks the whole event log or keyspace (erasure, export) or rebuilds the caches
# (reload): fewer examples keep the run short; their inputs are one path parameter, well covered by a few.
FEWER_EXAMPLES = {
    "DELETE /v1/profiles/{visitor_id}": 5,
    "GET /v1/profiles/{visitor_id}/export": 5,
    "POST /v1/admin/reload": 5,
}


def fuzz(app: FastAPI, service: str, scope: str) -> dict[str, int]:
    """Every operation of the app's OpenAPI spec, with generated valid and invalid inputs, sent with the key of
    `scope`; returns cases run per operation."""
    schema = from_asgi("/openapi.json", app)
    # Every body schema must resolve: an unresolvable $ref leaves the fuzzer nothing but an empty body.
    text = json.dumps(app.openapi())
    components = app.openapi()["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))
    assert "$defs" not in text and refs <= set(components), refs - set(components)
    ran: dict[str, int] = {}
    timings: dict[str, float] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        allowed = EXPECTED[(service, operation.method.upper(), operation.path)]
        ran[label] = 0
        started = time.perf_counter()
        fuzz_operation(operation, label, ran, scope, scope == "admin" or not allowed or scope in allowed)()
        timings[label] = time.perf_counter() - started
    print("\n" + "\n".join(f"  {scope} {label}: {ran[label]} cases in {timings[label]:.1f} s" for label in ran))
    return ran


def fuzz_operation(operation: Any, label: str, ran: dict[str, int], scope: str, allowed: bool) -> Callable[[], None]:
    examples = FEWER_EXAMPLES.get(label, FUZZ_SETTINGS.max_examples) if scope == "admin" else SCOPED_EXAMPLES
    headers = {"X-API-Key": KEYS[scope]}

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        response = case.call_and_validate(headers=headers, checks=[not_a_server_error])
        if not allowed:  # a scope violation: a key without the route's scope must never succeed
            assert response.status_code >= 400, (label, scope, response.status_code, response.text[:300])
        ran[label] += 1

    return run  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_recommend_api_never_answers_5xx_nor_beyond_a_keys_scope(recommend_app: FastAPI, scope: str) -> None:
    ran = fuzz(recommend_app, "recommend", scope)
    least = 10 if scope == "admin" else SCOPED_EXAMPLES - 1
    assert ran["POST /v1/recommend"] >= least and ran["PUT /v1/catalog/items"] >= least, ran
    print(f"\nrecommend ({scope} key): {sum(ran.values())} cases over {len(ran)} operations, no 5xx")


@pytest.mark.slow
@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_profile_api_never_answers_5xx_nor_beyond_a_keys_scope(profile_app: FastAPI, scope: str) -> None:
    ran = fuzz(profile_app, "profile", scope)
    assert ran["POST /v1/events"] >= (10 if scope == "admin" else SCOPED_EXAMPLES - 1), ran
    print(f"\nprofile ({scope} key): {sum(ran.values())} cases over {len(ran)} operations, no 5xx")
