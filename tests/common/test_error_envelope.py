"""Every error a client can meet, the framework's own included, answers in the one envelope."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.common.api import install_error_handlers
from services.common.errors import NotFound


def app_with_routes() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    @app.get("/missing")
    def missing() -> None:
        raise NotFound("no such thing")

    @app.post("/only-post")
    def only_post() -> dict[str, bool]:
        return {"ok": True}

    return app


def test_unknown_route_wrong_method_and_bugs_use_the_envelope() -> None:
    client = TestClient(app_with_routes(), raise_server_exceptions=False)
    unknown = client.get("/nowhere")
    assert unknown.status_code == 404 and unknown.json() == {"error": "NotFound", "detail": "Not Found"}
    wrong = client.get("/only-post")
    assert wrong.status_code == 405 and wrong.json()["error"] == "MethodNotAllowed"
    assert wrong.headers["allow"] == "POST"
    bug = client.get("/boom")
    assert bug.status_code == 500 and bug.json()["error"] == "InternalError"
    assert "hunter2" not in bug.text and "RuntimeError" not in bug.text  # internals stay in the log
    expected = client.get("/missing")
    assert expected.status_code == 404 and expected.json() == {"error": "NotFound", "detail": "no such thing"}


def test_both_services_answer_unknown_routes_in_the_envelope(settings_factory: object) -> None:
    from services.profile.app import create_app as create_profile_app
    from services.profile.settings import ProfileSettings
    from services.recommend.app import create_app as create_recommend_app
    from services.recommend.settings import RecommendSettings

    for app in (
        create_profile_app(settings_factory(ProfileSettings, redis_url=None)),  # type: ignore[operator]
        create_recommend_app(settings_factory(RecommendSettings, redis_url=None)),  # type: ignore[operator]
    ):
        response = TestClient(app).delete("/v1/not-a-route")
        assert response.status_code == 404 and response.json()["error"] == "NotFound"
