"""A minimal W3C WebDriver client over HTTP for Debian's chromedriver: the few commands the SDK test needs
(open a page, find elements, click like a user, run a script), so the test needs no browser-automation
package beyond the driver the system package manager installs."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class WebDriverError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium driven through chromedriver (both from Debian: scripts/ensure_system_packages.sh)."""

    def __init__(self, profile_dir: Path):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["chromedriver", f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        options = {
            "binary": shutil.which("chromium") or "/usr/bin/chromium",
            "args": [
                "--headless=new",
                "--no-sandbox",  # tests run as root in CI containers
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={profile_dir}",
                "--window-size=1280,1600",
            ],
        }
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        try:
            self._wait_ready()
            self.session = self._call("POST", "/session", {"capabilities": capabilities})["sessionId"]
        except Exception:
            self._stop_driver()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise WebDriverError("chromedriver did not start")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.http.request(method, path, json=body)
        value = response.json()["value"]
        if response.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:500]}")
        return value

    def _session(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def current_url(self) -> str:
        return str(self._session("GET", "/url"))

    def page_source(self) -> str:
        return str(self._session("GET", "/source"))

    def find_all(self, css: str) -> list[str]:
        found = self._session("POST", "/elements", {"using": "css selector", "value": css})
        return [element[ELEMENT] for element in found]

    def text(self, element: str) -> str:
        return str(self._session("GET", f"/element/{element}/text"))

    def attribute(self, element: str, name: str) -> str | None:
        value = self._session("GET", f"/element/{element}/attribute/{name}")
        return None if value is None else str(value)

    def click(self, element: str) -> None:
        """A real click: the driver scrolls the element into view and sends mouse events at its centre."""
        self._session("POST", f"/element/{element}/click", {})

    def on_new_document(self, script: str) -> None:
        """Run `script` in every page this session opens, before the page's own scripts (Chromium's DevTools
        command through chromedriver): how a test changes what a page sees, e.g. its clock."""
        command = {"cmd": "Page.addScriptToEvaluateOnNewDocument", "params": {"source": script}}
        self._session("POST", "/goog/cdp/execute", command)

    def execute(self, script: str, *args: Any) -> Any:
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_text(self, css: str, predicate: Any, timeout: float = 20.0) -> str:
        """The text of the first element matching `css` once `predicate(text)` holds."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            found = self.find_all(css)
            text = self.text(found[0]) if found else ""
            if predicate(text):
                return text
            time.sleep(0.1)
        raise WebDriverError(f"{css!r} still reads {text!r} after {timeout} s")

    def quit(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self._stop_driver()

    def _stop_driver(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(10)
