"""The demo shop's routes on the recommend service: off unless enabled, only a browser key ever goes into its
public pages, the SDK served is the repository's, and no path leaves its static directory. (The pages
themselves run in headless Chromium in test_browser_sdk.py.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.auth import hash_key
from services.recommend.app import create_app
from services.recommend.settings import RecommendSettings

SDK = Path(__file__).resolve().parents[2] / "sdk" / "js"
BROWSER, ADMIN, INGEST = "pk-browser-0123456789", "sk-admin-0123456789", "sk-ingest-0123456789"
KEYS = f"web:recommend+collect:{hash_key(BROWSER)},ops:admin:{hash_key(ADMIN)},shop:ingest+recommend:{hash_key(INGEST)}"


def test_the_demo_shop_is_off_by_default(settings_factory: Callable[..., Any]) -> None:
    with TestClient(create_app(settings_factory(RecommendSettings, redis_url=None))) as client:
        answer = client.get("/demo-shop/")
    assert answer.status_code == 404 and answer.json()["error"] == "NotFound"


@pytest.mark.parametrize(
    ("key", "message"),
    [(ADMIN, "never a server or admin key"), (INGEST, "never a server or admin key"), ("", "is empty")],
)
def test_a_server_key_never_goes_into_the_pages(settings_factory: Callable[..., Any], key: str, message: str) -> None:
    settings = settings_factory(RecommendSettings, redis_url=None, api_keys=KEYS, demo_shop=True, demo_shop_key=key)
    with pytest.raises(ValueError, match=message):
        create_app(settings)


def test_an_unknown_key_is_refused(settings_factory: Callable[..., Any]) -> None:
    settings = settings_factory(
        RecommendSettings, redis_url=None, api_keys=KEYS, demo_shop=True, demo_shop_key="pk-typo"
    )
    with pytest.raises(ValueError, match="unknown API key"):
        create_app(settings)


def test_pages_assets_and_the_config_they_read(settings_factory: Callable[..., Any]) -> None:
    settings = settings_factory(
        RecommendSettings,
        redis_url=None,
        api_keys=KEYS,
        demo_shop=True,
        demo_shop_key=BROWSER,
        demo_shop_profile_url="http://127.0.0.1:18001/",
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/demo-shop", follow_redirects=False).headers["location"] == "/demo-shop/"
        for path in ("/demo-shop/", "/demo-shop/product.html", "/demo-shop/cart.html"):
            page = client.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
            # Scripts from this origin only; the SDK may call this service and the profile service.
            assert "connect-src 'self' http://127.0.0.1:18001;" in page.headers["content-security-policy"]
        config = client.get("/demo-shop/assets/config.js").text
        assert config == (
            f'globalThis.SELARAS_SHOP = {{"endpoint": {{"profile": "http://127.0.0.1:18001"}}, "key": "{BROWSER}"}};\n'
        )
        for name in ("selaras.js", "selaras.mjs"):
            assert client.get(f"/demo-shop/assets/{name}").text == (SDK / name).read_text()
        assert client.get("/demo-shop/assets/shop.js").headers["content-type"].startswith("text/javascript")
        for missing in ("/demo-shop/secret.html", "/demo-shop/assets/..%2F__init__.py", "/demo-shop/assets/x.py"):
            answer = client.get(missing)
            assert answer.status_code == 404 and answer.json()["error"] == "NotFound", missing


def test_without_the_sdk_the_service_says_where_it_looked(settings_factory: Callable[..., Any], tmp_path: Path) -> None:
    settings = settings_factory(RecommendSettings, redis_url=None, demo_shop=True, sdk_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="RECOMMEND_SDK_DIR"):
        create_app(settings)
