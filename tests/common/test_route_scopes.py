"""Every route of both apps against an allow-list of the scopes it requires: a new route, or one that loses
its auth dependency, fails here until it is listed on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings

OPEN: frozenset[str] = frozenset()  # no key: probes, metrics (scraped inside the cluster), the API docs
ADMIN = frozenset({"admin"})

EXPECTED: dict[tuple[str, str, str], frozenset[str]] = {
    # profile
    ("profile", "POST", "/v1/events"): frozenset({"ingest", "collect"}),
    ("profile", "GET", "/v1/profiles/{visitor_id}"): ADMIN,
    ("profile", "PUT", "/v1/profiles/{visitor_id}/consent"): frozenset({"ingest"}),
    ("profile", "DELETE", "/v1/profiles/{visitor_id}"): ADMIN,
    ("profile", "GET", "/v1/profiles/{visitor_id}/export"): ADMIN,
    ("profile", "GET", "/v1/personas"): ADMIN,
    ("profile", "GET", "/healthz"): OPEN,
    ("profile", "GET", "/readyz"): OPEN,
    ("profile", "GET", "/metrics"): OPEN,
    # recommend
    ("recommend", "POST", "/v1/recommend"): frozenset({"recommend"}),
    ("recommend", "GET", "/v1/items/{item_id}/similar"): frozenset({"recommend"}),
    ("recommend", "PUT", "/v1/catalog/items"): ADMIN,
    ("recommend", "GET", "/v1/catalog/items"): ADMIN,
    ("recommend", "GET", "/v1/catalog/items/{item_id}"): ADMIN,
    ("recommend", "PATCH", "/v1/catalog/items/{item_id}"): ADMIN,
    ("recommend", "DELETE", "/v1/catalog/items/{item_id}"): ADMIN,
    ("recommend", "POST", "/v1/admin/reload"): ADMIN,
    ("recommend", "GET", "/v1/admin/models/{kind}"): ADMIN,
    ("recommend", "POST", "/v1/admin/models/{kind}/production"): ADMIN,
    ("recommend", "GET", "/v1/experiments"): ADMIN,
    ("recommend", "GET", "/v1/experiments/{key}"): ADMIN,
    ("recommend", "GET", "/v1/experiments/{key}/report"): ADMIN,
    ("recommend", "POST", "/v1/experiments"): ADMIN,
    ("recommend", "PATCH", "/v1/experiments/{key}"): ADMIN,
    ("recommend", "POST", "/v1/experiments/{key}/promote"): ADMIN,
    ("recommend", "GET", "/v1/experiments/audit"): ADMIN,
    ("recommend", "GET", "/v1/experiments/{key}/audit"): ADMIN,
    ("recommend", "GET", "/experiments"): OPEN,  # a static page; its data comes from the admin API above
    ("recommend", "GET", "/experiments/assets/{name}"): OPEN,
    ("recommend", "GET", "/v1/reports"): ADMIN,
    ("recommend", "GET", "/v1/reports/{name}"): ADMIN,
    ("recommend", "GET", "/reports"): OPEN,  # static pages too; the reports come from the admin API above
    ("recommend", "GET", "/reports/"): OPEN,
    ("recommend", "GET", "/reports/{name}"): OPEN,
    ("recommend", "GET", "/reports/assets/{name}"): OPEN,
    ("recommend", "POST", "/v1/next-best-message"): frozenset({"messages"}),
    ("recommend", "POST", "/v1/next-best-message:batch"): frozenset({"messages"}),
    ("recommend", "GET", "/healthz"): OPEN,
    ("recommend", "GET", "/readyz"): OPEN,
    ("recommend", "GET", "/metrics"): OPEN,
}
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def routes(routes_: Any) -> Iterator[Any]:
    """Every route, including those of included routers (FastAPI keeps them behind a wrapper)."""
    for route in routes_:
        if hasattr(route, "original_router"):
            assert not route.include_context.dependencies, "router-level dependencies: list them here"
            yield from routes(route.original_router.routes)
        else:
            yield route


def required_scopes(dependant: Any) -> frozenset[str]:
    found: set[str] = set()
    for dependency in dependant.dependencies:
        found |= getattr(dependency.call, "required_scopes", frozenset())
        found |= required_scopes(dependency)
    return frozenset(found)


def table(service: str, app: FastAPI) -> dict[tuple[str, str, str], frozenset[str]]:
    found: dict[tuple[str, str, str], frozenset[str]] = {}
    for route in routes(app.routes):
        if isinstance(route, APIRoute):
            for method in route.methods - {"HEAD"}:
                found[(service, method, route.path)] = required_scopes(route.dependant)
        else:
            assert route.path in DOCS, f"unexpected non-API route {route.path} on {service}"
    return found


def test_every_route_requires_exactly_the_listed_scopes(tmp_path: Path) -> None:
    profile = create_profile_app(ProfileSettings(data_dir=tmp_path, environment="test"))
    recommend = create_recommend_app(RecommendSettings(data_dir=tmp_path, environment="test"))
    actual = {**table("profile", profile), **table("recommend", recommend)}
    assert actual == EXPECTED
