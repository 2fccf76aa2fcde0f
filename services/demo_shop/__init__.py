"""The demo shop front: a home page with a recommended slot, product pages with similar items and a cart, built
on the browser SDK (sdk/js/) and served by the recommend service at /demo-shop/ when `RECOMMEND_DEMO_SHOP` is
on (`selaras demo` turns it on).

The pages are static files next to this module (package data, like the /experiments page). What differs per
deployment is one small script, `assets/config.js`: the profile service's URL and the public browser key the
SDK sends. The key is written into a page anyone can read, so `demo_shop_router` refuses a key that holds more
than the browser scopes (`recommend` + `collect`) when the service checks keys. The SDK files are read from
the repository's `sdk/js/` (the npm package), never copied, so the demo always runs the SDK that is tested.

Nothing here imports another service: the recommend app passes in what the pages need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from services.common.auth import BROWSER_SCOPES, ApiKeyAuth
from services.common.errors import NotFound, SelarasError

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
PREFIX: Final = "/demo-shop"
PAGES: Final = ("index.html", "product.html", "cart.html")
SDK_FILES: Final = ("selaras.js", "selaras.mjs")
MEDIA_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The key stands in for "no key" when the service checks none (development): any value passes then.
NO_AUTH_KEY: Final = "demo-no-auth"


@dataclass(frozen=True)
class DemoShopConfig:
    profile_url: str  # where the SDK sends events (another origin: it must allow this one by CORS)
    browser_key: str
    sdk_dir: Path


def check_browser_key(auth: ApiKeyAuth, key: str) -> str:
    """The key the pages may carry: a known browser key when keys are checked, or a stand-in when they are not.
    Raises ValueError (the service does not start) for a missing, unknown or server key."""
    if not auth.enabled:
        return key or NO_AUTH_KEY
    if not key:
        raise ValueError("RECOMMEND_DEMO_SHOP_KEY is empty: give the demo shop a browser key (recommend+collect)")
    try:
        name = auth.authenticate(key, "recommend")
    except SelarasError as error:
        raise ValueError(f"RECOMMEND_DEMO_SHOP_KEY is not a usable key: {error.detail}") from None
    scopes = auth.scopes_of(name)
    if not scopes <= BROWSER_SCOPES or "collect" not in scopes:
        raise ValueError(
            f"RECOMMEND_DEMO_SHOP_KEY names key {name!r} with scopes {sorted(scopes)}: the demo shop's pages are "
            "public, so it takes a browser key with exactly recommend+collect, never a server or admin key"
        )
    return key


def page_headers(profile_url: str) -> dict[str, str]:
    """Same-origin scripts and styles only; the SDK may call this service and the profile service."""
    parts = urlsplit(profile_url)
    profile_origin = f"{parts.scheme}://{parts.netloc}"
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' {profile_origin}; "
            "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "strict-origin-when-cross-origin",
        "Cache-Control": "no-cache",
    }


def config_script(config: DemoShopConfig) -> bytes:
    """`assets/config.js`: what the pages need to know about this deployment (the recommend service is the
    page's own origin)."""
    settings = {"endpoint": {"profile": config.profile_url.rstrip("/")}, "key": config.browser_key}
    return f"globalThis.SELARAS_SHOP = {json.dumps(settings)};\n".encode()


def demo_shop_router(config: DemoShopConfig) -> APIRouter:
    """The demo shop's routes: three pages and their assets, all static but `assets/config.js`."""
    missing = [name for name in SDK_FILES if not (config.sdk_dir / name).is_file()]
    if missing:
        raise ValueError(
            f"the demo shop needs the browser SDK ({', '.join(missing)}) in {config.sdk_dir}: "
            "set RECOMMEND_SDK_DIR to the repository's sdk/js"
        )
    headers = page_headers(config.profile_url)
    config_js = config_script(config)
    router = APIRouter(include_in_schema=False)

    def file_response(path: Path) -> Response:
        return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=headers)

    @router.get(PREFIX)
    def shop_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=308)

    @router.get(f"{PREFIX}/")
    def shop_home() -> Response:
        return file_response(STATIC_DIR / "index.html")

    @router.get(PREFIX + "/{page}")
    def shop_page(page: str) -> Response:
        if page not in PAGES:
            raise NotFound(f"no demo shop page {page!r}")
        return file_response(STATIC_DIR / page)

    @router.get(PREFIX + "/assets/{name}")
    def shop_asset(name: str) -> Response:
        if name == "config.js":
            return Response(config_js, media_type=MEDIA_TYPES[".js"], headers=headers)
        if name in SDK_FILES:
            return file_response(config.sdk_dir / name)
        path = STATIC_DIR / name
        # Only the files shipped next to this module: no path leaves the static directory.
        if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
            raise NotFound(f"no demo shop asset {name!r}")
        return file_response(path)

    return router
