"""The /experiments page at 1,400 px: a table wider than the report card (many arms and metrics) scrolls inside
its own box; neither it nor the card overflows. Headless Chromium through WebDriver, on the embedded store."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import uvicorn

from services.recommend.app import create_app
from services.recommend.settings import RecommendSettings
from tests.conftest import free_port, wait_for
from tests.experiments.test_dashboard_page import EXPERIMENTS_YAML, populate
from tests.sdk.webdriver import Chromium


@pytest.mark.slow
def test_wide_tables_scroll_inside_the_card_at_1400_px(tmp_path: Path) -> None:
    (tmp_path / "experiments.yaml").write_text(EXPERIMENTS_YAML)
    settings = RecommendSettings(
        data_dir=tmp_path / "data",
        redis_url=None,
        environment="test",
        experiments_file=tmp_path / "experiments.yaml",
    )
    populate(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    browser = None
    try:
        assert wait_for(lambda: server.started, timeout=120)
        browser = Chromium(tmp_path / "chrome")
        browser._session("POST", "/window/rect", {"width": 1400, "height": 1600})
        browser.get(f"http://127.0.0.1:{port}/experiments?experiment=banner-ab&lang=en")
        browser.wait_text("#arms-table tbody", lambda text: "treatment" in text)
        layout = browser.execute(
            """
            const card = document.getElementById('detail');
            const right = card.getBoundingClientRect().right;
            return {
              window: window.innerWidth,
              card: [card.clientWidth, card.scrollWidth],
              tables: [...card.querySelectorAll('table')].map((t) => ({
                id: t.id, right: t.getBoundingClientRect().right, cardRight: right,
                content: t.scrollWidth, box: t.clientWidth,
              })),
            };
            """
        )
        assert layout["window"] == 1400
        card_width, card_content = layout["card"]
        assert card_content <= card_width, "the card scrolls sideways as a whole"
        for table in layout["tables"]:
            assert table["right"] <= table["cardRight"], table
        # The arms table holds more than the card's width: it scrolls inside its own box.
        arms = next(t for t in layout["tables"] if t["id"] == "arms-table")
        assert arms["content"] > arms["box"], arms
    finally:
        if browser is not None:
            browser.quit()
        server.should_exit = True
        thread.join(30)
