"""The built-in /experiments page in headless Chromium (Debian's package): the per-arm table, the uplift bars
and the cumulative chart render from real report data, in Bahasa Indonesia and English, with an SRM warning;
the CUPED columns sit beside the unadjusted interval; the admin controls change the experiment through the API
(driven like a user through chromedriver)."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from services.experiments.store import open_experiment_store
from services.experiments.store.base import ExposureWrite, OutcomeWrite
from services.recommend.app import create_app
from services.recommend.settings import RecommendSettings
from tests.conftest import RedisServer, free_port, unique_name
from tests.sdk.webdriver import Chromium

DAY = 86_400.0
START = 1_789_948_800.0 + 3600  # 01:00 UTC, so the six days are six calendar days
EXPERIMENTS_YAML = """
experiments:
  - key: banner-ab
    description: Banner pribadi vs umum
    enabled: true
    slot_kinds: [product, banner]
    slots: [home, hero]
    arms:
      - {name: control, weight: 0.5, personalized: false}
      - {name: treatment, weight: 0.5, personalized: true}
    min_visitors_per_arm: 50
    planned_visitors: 2000
  - key: broken-split
    enabled: true
    slot_kinds: [cta]
    targeting: {devices: [mobile, app], visitor: returning}
    namespace: cta-tests
    namespace_range: [0.0, 0.5]
    arms:
      - {name: control, weight: 0.5, personalized: false}
      - {name: treatment, weight: 0.5, personalized: true}
"""


@dataclass
class Page:
    url: str
    settings: RecommendSettings
    directory: Path


def populate(settings: RecommendSettings) -> None:
    """Six days of a real experiment in the store: treatment clicks about 1.6× as often as control; three quarters
    of the visitors have a pre-period CTR (their CUPED covariate) that predicts their clicks."""
    store = open_experiment_store(settings)
    rng = random.Random(7)
    try:
        for i in range(600):
            visitor, arm = f"dv-{i}", ("control", "treatment")[i % 2]
            habit = rng.uniform(0.1, 1.9)  # the visitor's own click propensity, before and during the test
            covariates = {"ctr": 0.06 * habit} if i % 4 else None
            for day in range(i % 6, 6):
                if rng.random() > 0.5:
                    continue
                at = START + day * DAY + rng.uniform(0, DAY / 2)
                shown = {"all": {"ctr": 8.0}, "slot:home": {"ctr": 6.0}, "slot:hero": {"ctr": 2.0}}
                segment = ("hemat", "sultan")[i % 3 == 0]
                store.record_exposure(
                    ExposureWrite("banner-ab@1", visitor, arm, segment, at, shown, covariates=covariates)
                )
                clicks = sum(rng.random() < (0.08 if arm == "treatment" else 0.05) * habit for _ in range(8))
                writes = [
                    OutcomeWrite("banner-ab@1", visitor, f"{visitor}-{day}-{c}", at + 10, {"ctr": 1.0}, "slot:home")
                    for c in range(clicks)
                ]
                store.record_outcomes(writes)
        for i in range(200):  # 70/30 where 50/50 was configured
            arm = "control" if i % 10 < 7 else "treatment"
            store.record_exposure(ExposureWrite("broken-split@1", f"sv-{i}", arm, "hemat", START, {"all": {"ctr": 2}}))
    finally:
        store.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    directory = tmp_path_factory.mktemp("dashboard")
    (directory / "experiments.yaml").write_text(EXPERIMENTS_YAML)
    redis_server = RedisServer(free_port(), directory / "redis")
    redis_server.directory.mkdir()
    redis_server.start()
    namespace = unique_name("db")
    settings = RecommendSettings(
        data_dir=directory / "data",
        redis_url=redis_server.url,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        experiments_file=directory / "experiments.yaml",
    )
    populate(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started, "the recommend service did not start"
    try:
        yield Page(f"http://127.0.0.1:{port}", settings, directory)
    finally:
        server.should_exit = True
        thread.join(30)
        redis_server.stop(kill=True)
        shutil.rmtree(directory, ignore_errors=True)


def chromium(page: Page, path: str, *mode: str) -> str:
    profile = page.directory / unique_name("chrome")
    command = [
        "chromium",
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,2600",
        "--virtual-time-budget=10000",
        *mode,
        f"{page.url}{path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def report(page: Page, key: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{page.url}/v1/experiments/{key}/report", timeout=30).json()
    return body


def read_png(path: Path) -> np.ndarray:
    """A minimal PNG decoder (8-bit RGB/RGBA, not interlaced) -> height × width × 3 array. Chromium mostly
    writes "up"-filtered rows, which numpy undoes per row; the rare Paeth/average rows run byte by byte."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat = 8, b""
    width = height = channels = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, chunk = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and color in (2, 6) and interlace == 0
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, stride + 1)
    pixels = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 2:
            row = line + previous  # uint8 arithmetic wraps like the PNG spec
        elif kind == 1:
            row = np.cumsum(line.reshape(width, channels), axis=0, dtype=np.uint64).astype(np.uint8).ravel()
        else:
            row = bytearray(line.tobytes())
            for x in range(stride):
                left = row[x - channels] if x >= channels else 0
                up, up_left = int(previous[x]), int(previous[x - channels]) if x >= channels else 0
                if kind == 3:
                    row[x] = (row[x] + (left + up) // 2) & 0xFF
                else:
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    row[x] = (row[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
            row = np.frombuffer(bytes(row), dtype=np.uint8)
        pixels[y] = row
        previous = pixels[y]
    return pixels.reshape(height, width, channels)[:, :, :3]


def count_color(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    distance = np.abs(pixels.astype(np.int16) - np.array(rgb, dtype=np.int16)).max(axis=2)
    return int((distance <= tolerance).sum())


@pytest.mark.slow
def test_page_renders_the_report_in_bahasa_indonesia(page: Page) -> None:
    data = report(page, "banner-ab")
    dom = chromium(page, "/experiments?experiment=banner-ab", "--dump-dom")
    assert '<html lang="id"' in dom
    assert "Kenaikan kumulatif" in dom and "Varian" in dom and "Pembagian trafik" in dom
    for arm in data["arms"]:
        row = dom.split(f'data-arm="{arm["name"]}"', 1)[1].split("</tr>", 1)[0]
        assert f'data-field="n">{int(arm["n"])}<' in row, row
    ctr = next(r for r in data["results"] if r["metric"] == "ctr")
    assert ctr["uplift"] > 0.3 and ctr["significant"]
    assert f'data-uplift="{ctr["uplift"]}"' in dom  # the bar is drawn from the report's number
    assert len(data["timeline"]) == 6
    drawn = [p for p in data["timeline"] if p["arms"]["treatment"]["uplift"] is not None]
    assert len(drawn) >= 4 and f'data-points="{len(drawn)}"' in dom
    assert 'id="srm-warning" class="banner danger" role="alert" hidden=""' in dom
    assert 'data-group="home"' in dom and 'data-group="sultan"' in dom


@pytest.mark.slow
def test_page_in_english_and_the_srm_warning(page: Page) -> None:
    dom = chromium(page, "/experiments?experiment=broken-split&lang=en", "--dump-dom")
    assert '<html lang="en"' in dom and "Cumulative uplift" in dom
    assert report(page, "broken-split")["srm"]["flagged"]
    warning = dom.split('id="srm-warning"', 1)[1].split("</div>", 1)[0]
    assert "hidden" not in warning.split(">", 1)[0] and "Sample ratio mismatch" in warning
    assert 'data-decision="investigate_srm"' in dom
    meta = dom.split('id="experiment-meta"', 1)[1].split("</p>", 1)[0]
    assert "Targeting: devices = mobile, app; visitor = returning; namespace cta-tests [0, 0.5)" in meta


@pytest.mark.slow
def test_screenshot_shows_the_bars_and_the_cumulative_chart(page: Page) -> None:
    shot = page.directory / "page.png"
    chromium(page, "/experiments?experiment=banner-ab", f"--screenshot={shot}")
    rows = read_png(shot)
    assert rows.shape == (2600, 1280, 3)
    assert count_color(rows, (10, 125, 79)) > 300  # green uplift bars (treatment better)
    assert count_color(rows, (29, 78, 216)) > 300  # blue confidence-interval whiskers
    assert count_color(rows, (194, 65, 12)) > 500  # orange cumulative uplift line and points
    assert count_color(rows, (158, 197, 254)) > 2000  # light-blue always-valid bands


def pct(value: float) -> str:
    """The page's fmt.pct: a signed percentage with one decimal."""
    return f"{'+' if value > 0 else ''}{value * 100:.1f}%"


@pytest.mark.slow
def test_page_shows_cuped_beside_the_unadjusted_interval(page: Page) -> None:
    ctr = next(r for r in report(page, "banner-ab")["results"] if r["metric"] == "ctr")
    cuped = ctr["cuped"]
    assert cuped is not None and cuped["variance_reduction_pct"] > 5  # the pre-period CTR predicts clicks
    dom = chromium(page, "/experiments?experiment=banner-ab&lang=en", "--dump-dom")
    assert "CUPED uplift" in dom and "CUPED 95% interval" in dom and "Variance reduction" in dom
    row = dom.split('<tr data-metric="ctr" data-arm="treatment">', 1)[1].split("</tr>", 1)[0]
    assert f"{pct(ctr['ci_lower'])} … {pct(ctr['ci_upper'])}" in row  # unadjusted
    assert f"{pct(cuped['ci_lower'])} … {pct(cuped['ci_upper'])}" in row  # adjusted, beside it
    reduction = cuped["variance_reduction_pct"]
    assert f'data-value="{reduction}">{reduction:.1f}%<' in row


@pytest.mark.slow
def test_the_admin_controls_change_the_experiment_through_the_api(page: Page) -> None:
    def stored() -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{page.url}/v1/experiments/broken-split", timeout=30).json()
        return body

    browser = Chromium(page.directory / unique_name("driver"))
    try:
        browser.get(f"{page.url}/experiments?experiment=broken-split&lang=en")
        browser.wait_text("#experiment-title", lambda text: text == "broken-split")
        assert stored()["enabled"] is True
        browser.click(browser.find_all("#control-stop")[0])
        browser.wait_text("#admin-status", lambda text: text.startswith("Saved: disabled"))
        assert stored()["enabled"] is False
        assert browser.attribute(browser.find_all("#control-start")[0], "disabled") is None  # can start again
        browser.click(browser.find_all("#control-start")[0])
        browser.wait_text("#admin-status", lambda text: text.startswith("Saved: running"))
        assert stored()["enabled"] is True
        # A refused change shows the API's answer, naming the field.
        browser.execute("document.getElementById('control-coverage').value = '150';")
        browser.click(browser.find_all("#control-coverage-apply")[0])
        status = browser.wait_text("#admin-status", lambda text: text.startswith("422"))
        assert "coverage" in status
        assert stored()["coverage"] == 1.0
        audit = httpx.get(f"{page.url}/v1/experiments/broken-split/audit", timeout=30).json()["entries"]
        assert [e["after"]["enabled"] for e in audit[:2]] == [True, False]  # newest first: started, stopped
    finally:
        browser.quit()
