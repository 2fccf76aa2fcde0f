"""Both services on real HTTP ports (a browser and a generated client need sockets, not a TestClient), with a
browser key (`recommend` + `collect`), an admin key and a small catalog, on real Redis. The recommend service
serves the demo shop front (/demo-shop/) with the browser key, as `selaras demo` does."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from services.common.auth import hash_key
from services.profile.app import create_app as create_profile_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.settings import RecommendSettings
from tests.conftest import REDIS_URL, clean_namespace, free_port, unique_name, wait_for

BROWSER_KEY = "pk-browser-0123456789"
ADMIN_KEY = "sk-admin-0123456789"
CATEGORIES = ("sepatu", "tas", "kaos")
EXPERIMENT = "sdk-home"
# Every visitor in the experiment (no holdout): a click the SDK sends must reach the arm that served it.
EXPERIMENTS_YAML = f"""
holdout: 0
experiments:
  - key: {EXPERIMENT}
    enabled: true
    slot_kinds: [product]
    slots: [home_products]
    arms:
      - {{name: control, weight: 0.5, personalized: false}}
      - {{name: treatment, weight: 0.5, personalized: true}}
"""


@dataclass
class Services:
    profile_url: str
    recommend_url: str
    directory: Path
    catalog: dict[str, dict[str, Any]]

    @property
    def demo_shop(self) -> str:
        return f"{self.recommend_url}/demo-shop/"

    def admin(self) -> httpx.Client:
        return httpx.Client(headers={"X-API-Key": ADMIN_KEY}, timeout=30)


@dataclass
class Running:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


def serve(app: FastAPI, port: int | None = None) -> Running:
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=120), "a service did not start"
    return Running(f"http://127.0.0.1:{port}", server, thread)


def catalog_items(shop_url: str) -> list[dict[str, Any]]:
    return [
        {
            "item_id": f"sku-{i}",
            "title": f"Produk {CATEGORIES[i % 3]} nomor {i}",
            "category": CATEGORIES[i % 3],
            "brand": "Lokal",
            "price": 50_000.0 + 1000 * i,
            "stock": 10,
            "url": f"{shop_url}/product.html?item=sku-{i}",
        }
        for i in range(12)
    ]


def start_services(directory: Path, shop_origin: str) -> tuple[Services, list[Running]]:
    namespace = unique_name("sdk")
    # The demo shop's pages come from the recommend service: its origin sends events to the profile service.
    recommend_port = free_port()
    keys = f"browser:recommend+collect:{hash_key(BROWSER_KEY)},ops:admin:{hash_key(ADMIN_KEY)}"
    common: dict[str, Any] = {
        "data_dir": directory / "data",
        "redis_url": REDIS_URL,
        "namespace": namespace,
        "feast_project": namespace,
        "environment": "test",
        "api_keys": keys,
        # The shop's pages are another origin than the services; the demo shop's is the recommend service's.
        "cors_origins": f"{shop_origin},http://127.0.0.1:{recommend_port}",
    }
    clean_namespace(REDIS_URL, namespace)
    experiments = directory / "experiments.yaml"
    experiments.write_text(EXPERIMENTS_YAML)
    profile = serve(create_profile_app(ProfileSettings(**common, aggregator_idle_s=0.01)))
    recommend_settings = RecommendSettings(
        **common,
        refresh_interval_s=0.3,
        experiments_file=experiments,
        demo_shop=True,
        demo_shop_key=BROWSER_KEY,
        demo_shop_profile_url=profile.url,
    )
    recommend = serve(create_recommend_app(recommend_settings), recommend_port)
    recommend_url = recommend.url
    items = catalog_items(shop_origin)
    with httpx.Client(headers={"X-API-Key": ADMIN_KEY}, timeout=30) as admin:
        response = admin.put(f"{recommend_url}/v1/catalog/items", json={"items": items})
        assert response.status_code == 200, response.text

        def serves_items() -> bool:
            body = {"visitor_id": "warmup", "slots": [{"name": "home", "count": 4}]}
            answer = admin.post(f"{recommend_url}/v1/recommend", json=body)
            return answer.status_code == 200 and len(answer.json()["slots"][0]["items"]) == 4

        assert wait_for(serves_items, timeout=30), "the recommend service never served the catalog"
    services = Services(profile.url, recommend_url, directory, {item["item_id"]: item for item in items})
    return services, [profile, recommend]


def stop(running: list[Running]) -> None:
    for service in running:
        service.server.should_exit = True
    for service in running:
        service.thread.join(30)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("sdk")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
