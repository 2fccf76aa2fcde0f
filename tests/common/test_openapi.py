"""The OpenAPI documents tell generated clients the truth: the key each route needs, and the error body every
error answer actually has (checked against answers the services send)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema
from fastapi.testclient import TestClient

from services.common.api import api_routes, route_scopes
from services.common.auth import hash_key
from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings

BROWSER, OPS = "browser-key-0001", "ops-key-0002"
KEYS = f"web:recommend:{hash_key(BROWSER)},ops:admin:{hash_key(OPS)}"
SHIPPED_EXPERIMENT = {
    "key": "personalized-home",
    "slot_kinds": ["product"],
    "arms": [
        {"name": "control", "weight": 0.5, "personalized": False},
        {"name": "treatment", "weight": 0.5, "personalized": True},
    ],
}


def error_validator(document: dict[str, Any]) -> Callable[[Any], None]:
    schema = {**document["components"]["schemas"]["ErrorBody"], "components": document["components"]}

    def validate(body: Any) -> None:
        jsonschema.validate(body, schema)

    return validate


def test_every_keyed_route_documents_its_key_and_every_error_the_envelope(settings_factory: Any) -> None:
    for create, kind in ((create_profile_app, ProfileSettings), (create_recommend_app, RecommendSettings)):
        app = create(settings_factory(kind, redis_url=None, api_keys=KEYS))
        document = app.openapi()
        assert set(document["components"]["securitySchemes"]) == {"ApiKey", "Bearer"}
        assert document["components"]["securitySchemes"]["ApiKey"] == {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
        }
        assert "HTTPValidationError" not in document["components"]["schemas"]
        routes = {(r.path, m.lower()): r for r in api_routes(app.routes) for m in r.methods}
        checked = 0
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                scopes = route_scopes(routes[(path, method)])
                responses = operation["responses"]
                if scopes is not None:
                    assert operation["security"] == [{"ApiKey": []}, {"Bearer": []}], (path, method)
                    assert {"401", "403", "429"} <= set(responses), (path, method)
                    assert "API key scope" in operation["description"]
                else:
                    assert "security" not in operation, (path, method)
                for status, response in responses.items():
                    if status[0] in "45":
                        schema = response["content"]["application/json"]["schema"]
                        assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
                checked += 1
        assert checked >= 6  # every /v1 operation of the app (the profile API has six)


def test_documented_errors_are_the_bodies_the_services_send(settings_factory: Any) -> None:
    settings = settings_factory(RecommendSettings, redis_url=None, api_keys=KEYS)
    with TestClient(create_recommend_app(settings)) as recommend:
        validate = error_validator(recommend.app.openapi())  # type: ignore[attr-defined]
        answers = [
            (401, recommend.post("/v1/recommend", json={"visitor_id": "v", "slots": [{"name": "a"}]})),
            (403, recommend.put("/v1/catalog/items", json={"items": []}, headers={"X-API-Key": BROWSER})),
            (422, recommend.post("/v1/recommend", json={"visitor_id": "v", "slots": []}, headers={"X-API-Key": OPS})),
            (422, recommend.put("/v1/catalog/items", json={"items": [{"kind": "x"}]}, headers={"X-API-Key": OPS})),
            (404, recommend.get("/v1/experiments/nope", headers={"X-API-Key": OPS})),
            (404, recommend.patch("/v1/experiments/nope", json={"enabled": True}, headers={"X-API-Key": OPS})),
            (
                409,  # the shipped experiments.yaml seeded the store with this key
                recommend.post("/v1/experiments", json=SHIPPED_EXPERIMENT, headers={"X-API-Key": OPS}),
            ),
            (
                422,
                recommend.patch(
                    "/v1/experiments/personalized-home", json={"weights": {"nope": 1}}, headers={"X-API-Key": OPS}
                ),
            ),
            (404, recommend.get("/v1/items/nope/similar", headers={"X-API-Key": BROWSER})),
            (422, recommend.get("/v1/items/nope/similar?limit=0", headers={"X-API-Key": BROWSER})),
            (
                422,
                recommend.post(
                    "/v1/recommend",
                    json={"visitor_id": "v", "slots": [{"name": "s", "strategy": "rerank", "candidate_ids": []}]},
                    headers={"X-API-Key": BROWSER},
                ),
            ),
        ]
    profile_settings = settings_factory(ProfileSettings, redis_url=None, api_keys=KEYS, aggregator_enabled=False)
    with TestClient(create_profile_app(profile_settings)) as profile:
        answers.append(
            (422, profile.post("/v1/events", json={"events": [{"type": "nope"}]}, headers={"X-API-Key": OPS}))
        )
    for status, response in answers:
        assert response.status_code == status, response.text
        validate(response.json())
    first_invalid = answers[3][1].json()["errors"][0]
    assert first_invalid["index"] == 0 and first_invalid["field"]


def test_the_recommend_document_tells_what_happens_to_unknown_ids(settings_factory: Any) -> None:
    document = create_recommend_app(settings_factory(RecommendSettings, redis_url=None, api_keys=KEYS)).openapi()
    description = document["paths"]["/v1/recommend"]["post"]["description"]
    assert "unknown_candidates" in description and "context.item_ids" in description
    similar = document["paths"]["/v1/items/{item_id}/similar"]["get"]
    assert {"404", "422"} <= set(similar["responses"])
    assert {p["name"] for p in similar["parameters"]} == {"item_id", "strategy", "limit"}
    for path, method in (("/v1/experiments/{key}", "patch"), ("/v1/experiments/{key}/promote", "post")):
        assert {"404", "409", "422"} <= set(document["paths"][path][method]["responses"]), (path, method)
