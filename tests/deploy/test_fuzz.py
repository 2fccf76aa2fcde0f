"""Schemathesis fuzzes both OpenAPI specs against the real apps (ASGI, real Redis and Feast): never a 5xx.

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

from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings
from tests.conftest import REDIS_URL, SessionWorld, clean_namespace, copy_keys, unique_name

FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


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


def fuzz(app: FastAPI) -> dict[str, int]:
    """Every operation of the app's OpenAPI spec, with generated valid and invalid inputs; returns cases run."""
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
        ran[label] = 0
        started = time.perf_counter()
        fuzz_operation(operation, label, ran)()
        timings[label] = time.perf_counter() - started
    print("\n" + "\n".join(f"  {label}: {ran[label]} cases in {timings[label]:.1f} s" for label in ran))
    return ran


def fuzz_operation(operation: Any, label: str, ran: dict[str, int]) -> Callable[[], None]:
    examples = FEWER_EXAMPLES.get(label, FUZZ_SETTINGS.max_examples)

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        case.call_and_validate(checks=[not_a_server_error])
        ran[label] += 1

    return run  # type: ignore[no-any-return]


@pytest.mark.slow
def test_recommend_api_never_answers_5xx(recommend_app: FastAPI) -> None:
    ran = fuzz(recommend_app)
    assert ran["POST /v1/recommend"] > 10 and ran["PUT /v1/catalog/items"] > 10, ran
    print(f"\nrecommend: {sum(ran.values())} cases over {len(ran)} operations, no 5xx")


@pytest.mark.slow
def test_profile_api_never_answers_5xx(profile_app: FastAPI) -> None:
    ran = fuzz(profile_app)
    assert ran["POST /v1/events"] > 10, ran
    print(f"\nprofile: {sum(ran.values())} cases over {len(ran)} operations, no 5xx")
