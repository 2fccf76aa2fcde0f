"""The browser SDK (sdk/js/) in headless Chromium against both services on real HTTP ports, through the demo shop
front the recommend service serves (/demo-shop/, services/demo_shop/): the home page includes the SDK with a
`<script>` tag and renders a recommended slot, a real click sends a click event echoing the recommendation id,
the product page (loading the ES module) tracks a view and an add-to-cart that echo it too and renders the
similar-items slot, and leaving the page flushes the queue. What the profile service stored is read back with
an admin key, and the click is counted in the experiment report for the arm that served the slot. Consent,
batches with an invalid event and origins outside the allow-list are SDK behaviours the demo shop does not
show: they run on small pages of the test's own, on another origin."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, unique_name, wait_for
from tests.sdk.conftest import ADMIN_KEY, BROWSER_KEY, EXPERIMENT, Services, start_services, stop
from tests.sdk.webdriver import Chromium

SDK = Path(__file__).resolve().parents[2] / "sdk" / "js"

# A shop page on an origin the services do not allow (the test serves it itself).
HOME = """<!doctype html>
<html><head><meta charset="utf-8"><title>Toko Demo</title></head>
<body>
<h1>Toko Demo</h1>
<p id="status">loading</p>
<div id="home"></div>
<script src="/selaras.js"></script>
<script>
  Selaras.init({endpoint: __ENDPOINT__, key: "__KEY__", flushIntervalMs: 200});
  Selaras.track("page_view", {page: "home"});
  Selaras.recommend([{name: "home", count: 4}], {page: "home"})
    .then(function () { return Selaras.render("home", document.getElementById("home")); })
    .then(function (slot) { document.getElementById("status").textContent = "rendered " + slot.items.length; })
    .catch(function (error) { document.getElementById("status").textContent = "error " + error.message; });
</script>
</body></html>
"""

# A page whose shop asks for consent first: nothing may leave the browser before Selaras.consent(true).
CONSENT = """<!doctype html>
<html><head><meta charset="utf-8"><title>Izin</title></head>
<body>
<p id="status">loading</p>
<script src="/selaras.js"></script>
<script>
  Selaras.init({endpoint: __ENDPOINT__, key: "__KEY__", flushIntervalMs: 50, requireConsent: true});
  Selaras.track("page_view", {page: "before-consent"});
  document.getElementById("status").textContent = "waiting";
</script>
</body></html>
"""


@dataclass
class Shop:
    url: str
    services: Services
    other_origin: str  # serves the same pages from an origin the services do not allow


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def shop(workdir: Path) -> Iterator[Shop]:
    site = workdir / "site"
    site.mkdir()
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    services, servers = start_services(workdir, origin)
    endpoint = json.dumps({"profile": services.profile_url, "recommend": services.recommend_url})
    for name, page in (("index.html", HOME), ("consent.html", CONSENT)):
        (site / name).write_text(page.replace("__ENDPOINT__", endpoint).replace("__KEY__", BROWSER_KEY))
    for name in ("selaras.js", "selaras.mjs"):
        shutil.copy(SDK / name, site / name)
    handler = functools.partial(QuietHandler, directory=str(site))
    httpds = [ThreadingHTTPServer(("127.0.0.1", port), handler), ThreadingHTTPServer(("127.0.0.1", 0), handler)]
    for httpd in httpds:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield Shop(origin, services, f"http://127.0.0.1:{httpds[1].server_address[1]}")
    finally:
        for httpd in httpds:
            httpd.shutdown()
        stop(servers)


@pytest.fixture
def browser(workdir: Path) -> Iterator[Chromium]:
    chromium = Chromium(workdir / unique_name("chrome"))
    yield chromium
    chromium.quit()


def stored_events(shop: Shop, visitor: str) -> list[dict[str, Any]]:
    with shop.services.admin() as admin:
        response = admin.get(f"{shop.services.profile_url}/v1/profiles/{visitor}/export")
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def test_demo_shop_renders_a_slot_and_a_click_echoes_the_recommendation_id(shop: Shop, browser: Chromium) -> None:
    demo = shop.services.demo_shop
    browser.get(demo)
    assert browser.wait_text("#status", lambda text: text != "loading") == "rendered 8"
    rendered = browser.find_all("#home [data-selaras-item]")
    assert len(rendered) == 8
    items = [browser.attribute(element, "data-selaras-item") for element in rendered]
    titles = [browser.text(browser.find_all(f'[data-selaras-item="{item}"] .selaras-title')[0]) for item in items]
    assert titles == [shop.services.catalog[str(item)]["title"] for item in items]
    recommendation_id = browser.attribute(browser.find_all("#home")[0], "data-selaras-recommendation")
    assert recommendation_id
    visitor = browser.execute("return Selaras.visitorId()")
    assert visitor.startswith("sv-")
    assert browser.execute("return localStorage.getItem('selaras_vid')") == visitor
    assert "pk-browser" in browser.execute("return SELARAS_SHOP.key") and ADMIN_KEY not in browser.page_source()

    clicked = str(items[1])
    browser.click(rendered[1])  # a user's click: the card links to the shop's product page
    status = browser.wait_text("#status", lambda text: text.startswith("viewed"))
    assert status == f"viewed {clicked} as {visitor}", "the visitor id did not survive the navigation"
    assert browser.current_url() == f"{demo}product.html?item={clicked}"
    assert browser.text(browser.find_all("#product-title")[0]) == shop.services.catalog[clicked]["title"]
    # The item-to-item slot: neighbours of the product, never the product itself.
    browser.wait_text("#similar", lambda text: bool(text))
    similar = [browser.attribute(e, "data-selaras-item") for e in browser.find_all("#similar [data-selaras-item]")]
    assert similar and clicked not in similar
    browser.click(browser.find_all("#add-to-cart")[0])
    assert browser.wait_text("#cart-count", lambda text: text == "1") == "1"
    browser.get("about:blank")  # pagehide: the product page's queued events go out with keepalive

    def stored() -> dict[str, dict[str, Any]]:
        return {event["type"]: event for event in stored_events(shop, visitor)}

    wanted = {"page_view", "click", "product_view", "add_to_cart"}
    assert wait_for(lambda: wanted <= stored().keys(), timeout=20), stored()
    events = stored()
    assert events["click"]["item_id"] == clicked
    assert events["click"]["recommendation_id"] == recommendation_id
    assert events["click"]["properties"] == {"slot": "home_products", "position": 1}
    for echoed in ("product_view", "add_to_cart"):
        assert events[echoed]["item_id"] == clicked
        assert events[echoed]["recommendation_id"] == recommendation_id, f"the {echoed} did not echo it"
    assert events["page_view"]["properties"] == {"page": "home"}
    assert all(event["visitor_id"] == visitor for event in events.values())

    # The cart page lists what was added, for the same visitor.
    browser.get(f"{demo}cart.html")
    browser.wait_text("#status", lambda text: text != "loading")
    assert len(browser.find_all(f'#cart-lines li[data-item="{clicked}"]')) == 1

    # The echoed id attributes the click to the experiment exposure: one click, in the "home_products" slot.
    def clicks(report: dict[str, Any]) -> tuple[float, float]:
        home = [row for row in report["breakdowns"]["slot"] if row["group"] == "home_products"]
        in_home = sum(arm["metrics"]["ctr"]["total"] for row in home for arm in row["arms"].values())
        return sum(arm["metrics"]["ctr"]["total"] for arm in report["arms"]), in_home

    with shop.services.admin() as admin:
        url = f"{shop.services.recommend_url}/v1/experiments/{EXPERIMENT}/report"
        assert wait_for(lambda: clicks(admin.get(url).json()) == (1.0, 1.0), timeout=20), admin.get(url).json()


def test_browser_key_may_not_send_purchases(shop: Shop, browser: Chromium) -> None:
    browser.get(shop.services.demo_shop)
    browser.wait_text("#status", lambda text: text != "loading")
    refused = browser.execute(
        "try { Selaras.track('purchase', {item_id: 'sku-1'}); return null; } catch (e) { return e.message; }"
    )
    assert "server" in refused
    # And the service refuses it too, whatever a modified page sends with the public key.
    answer = browser.execute(
        """
        return fetch(arguments[0] + '/v1/events', {
          method: 'POST', headers: {'Content-Type': 'application/json', 'X-API-Key': arguments[1]},
          body: JSON.stringify({events: [{event_id: 'p1', visitor_id: Selaras.visitorId(), type: 'purchase',
                                          item_id: 'sku-1', timestamp: new Date().toISOString()}]}),
        }).then(r => r.json().then(body => [r.status, body]));
        """,
        shop.services.profile_url,
        BROWSER_KEY,
    )
    status, body = answer
    assert status == 403 and body["errors"][0]["field"] == "type", body


def test_a_visitor_clock_an_hour_fast_still_gets_its_events_stored(shop: Shop, browser: Chromium) -> None:
    # The service refuses events dated more than 5 minutes in its future; the SDK stamps them with the
    # service clock it learned from the recommend answer. The browser's clock runs an hour ahead.
    browser.on_new_document("const realNow = Date.now; Date.now = () => realNow() + 3600000;")
    browser.get(shop.services.demo_shop)
    assert browser.wait_text("#status", lambda text: text != "loading") == "rendered 8"
    assert browser.execute("return Date.now() - new Date().getTime()") > 3_500_000  # the skew is in place
    visitor = browser.execute("return Selaras.visitorId()")
    browser.execute("return Selaras.flush()")
    assert wait_for(lambda: bool(stored_events(shop, visitor)), timeout=20), "the page view was refused"
    (page_view,) = stored_events(shop, visitor)
    # These services run on wall time (no clock is injected), so the service's "now" is the test's.
    assert abs((datetime.fromisoformat(page_view["timestamp"]) - datetime.now(UTC)).total_seconds()) < 60


def test_nothing_is_sent_before_consent(shop: Shop, browser: Chromium) -> None:
    browser.get(f"{shop.url}/consent.html")
    browser.wait_text("#status", lambda text: text == "waiting")
    visitor = browser.execute("return Selaras.visitorId()")
    browser.execute("return Selaras.flush()")
    assert stored_events(shop, visitor) == []
    stored_id = "return [localStorage.getItem('selaras_vid'), document.cookie.includes('selaras_vid=')]"
    assert browser.execute(stored_id) == [None, False], "an identifier was stored before consent"
    browser.execute("Selaras.consent(true); Selaras.track('search', {query: 'sepatu lari'}); return Selaras.flush()")
    assert wait_for(lambda: bool(stored_events(shop, visitor)), timeout=20)
    assert [(e["type"], e.get("query")) for e in stored_events(shop, visitor)] == [("search", "sepatu lari")]
    assert browser.execute(stored_id) == [visitor, True]
    browser.execute("Selaras.consent(false)")
    assert browser.execute(stored_id) == [None, False], "a refusal must remove the stored identifier"


def test_origins_outside_the_allow_list_are_refused_by_the_browser(shop: Shop, browser: Chromium) -> None:
    browser.get(f"{shop.other_origin}/index.html")
    status = browser.wait_text("#status", lambda text: text != "loading")
    assert status.startswith("error"), status
    assert browser.find_all("#home [data-selaras-item]") == []


def test_an_invalid_event_does_not_lose_the_rest_of_its_batch(shop: Shop, browser: Chromium) -> None:
    browser.get(f"{shop.url}/consent.html")
    browser.wait_text("#status", lambda text: text == "waiting")
    visitor = browser.execute("return Selaras.visitorId()")
    browser.execute(
        """
        Selaras.consent(true);
        Selaras.track('search', {query: 'tas kulit'});
        Selaras.track('product_view', {item_id: 'sku-2', note: 'x'.repeat(600)});  // longer than 512: 422
        Selaras.track('add_to_cart', {item_id: 'sku-3', quantity: 1});
        return Selaras.flush();
        """
    )
    assert wait_for(lambda: len(stored_events(shop, visitor)) == 2, timeout=20), stored_events(shop, visitor)
    assert sorted(e["type"] for e in stored_events(shop, visitor)) == ["add_to_cart", "search"]
