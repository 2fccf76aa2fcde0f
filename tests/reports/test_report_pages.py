"""HTML reports end to end: `selaras evaluate ranking` and `selaras personas` run on the demo world and store
their reports; the recommend service serves them at /reports/, and headless Chromium shows the list, the figures
and the plots, each mark carrying the number the command computed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from services.cli import app as cli
from services.common.auth import hash_key
from services.common.settings import CommonSettings
from services.common.storage import Namespace, open_store
from services.profile.personas.repository import load_model, load_report
from services.recommend.settings import RecommendSettings
from services.recommend.training.evaluation import PIPELINE
from services.reports.pages import METHOD_LABELS
from services.reports.store import ReportStore
from tests.conftest import REDIS_URL, WORLD_END, SessionWorld, free_port, unique_name, wait_for
from tests.sdk.webdriver import Chromium

ADMIN_KEY = "sk-reports-0123456789"
RANKING = "ranking-leave-last-out-product-view"


@dataclass
class Served:
    url: str
    settings: CommonSettings
    directory: Path
    ranking: dict[str, Any]  # the evaluation's JSON report


def cli_env(settings: CommonSettings) -> dict[str, str]:
    return {
        "REDIS_URL": REDIS_URL,
        "SELARAS_NAMESPACE": settings.namespace,
        "SELARAS_FEAST_PROJECT": settings.feast_project,
        "SELARAS_ENVIRONMENT": "test",
        "SELARAS_DATA_DIR": str(settings.data_dir),
        "SELARAS_CLOCK_START": WORLD_END.isoformat(),  # the world's time, whatever the calendar says
    }


def run(args: list[str], settings: CommonSettings) -> str:
    result = CliRunner().invoke(cli, args, env=cli_env(settings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def served(world: SessionWorld, world_fork: CommonSettings) -> Iterator[Served]:
    import json

    # Personas change the visitors they assign: they run on a copy of the shared world.
    fork = world_fork
    directory = fork.data_dir.parent
    output = run(["personas", "--data-dir", str(fork.data_dir), "--no-backfill"], fork)
    assert "HTML report: /reports/personas" in output
    assert (fork.data_dir / "reports" / "personas.html").is_file()
    # The evaluation only reads the world (its event log is not in the copy); its report is moved to the copy.
    out = directory / "ranking.json"
    args = ["evaluate", "ranking", "--data-dir", str(world.settings.data_dir), "--max-visitors", "60"]
    output = run([*args, "--max-queries", "1500", "--out", str(out)], world.settings)
    assert f"HTML report: /reports/{RANKING}" in output
    source, target = open_store(world.settings), open_store(fork)
    try:
        report = ReportStore(source).get(RANKING)
        assert report is not None
        ReportStore(target).save(report)
        source.delete(Namespace.REPORTS, [RANKING])
    finally:
        source.close()
        target.close()
    settings = RecommendSettings(
        **fork.model_dump(include={"data_dir", "redis_url", "namespace", "feast_project", "environment"}),
        api_keys=f"ops:admin:{hash_key(ADMIN_KEY)}",
        experiments_file=directory / "none.yaml",
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=120), "the recommend service did not start"
    try:
        yield Served(f"http://127.0.0.1:{port}", fork, directory, json.loads(out.read_text()))
    finally:
        server.should_exit = True
        thread.join(30)


def _app(settings: RecommendSettings) -> Any:
    from services.recommend.app import create_app

    return create_app(settings)


@pytest.fixture
def browser(served: Served) -> Iterator[Chromium]:
    chromium = Chromium(served.directory / unique_name("chrome"))
    yield chromium
    chromium.quit()


def marks(browser: Chromium, css: str) -> list[dict[str, Any]]:
    """Every element matching `css` with its data-* attributes and its drawn size."""
    rows: list[dict[str, Any]] = browser.execute(
        """
        return [...document.querySelectorAll(arguments[0])].map((node) => {
          const box = node.getBoundingClientRect();
          return {...node.dataset, width: box.width, height: box.height};
        });
        """,
        css,
    )
    return rows


@pytest.mark.slow
def test_the_list_links_both_reports_and_asks_for_a_key_without_one(served: Served, browser: Chromium) -> None:
    browser.get(f"{served.url}/reports/")
    browser.wait_text("#error", lambda text: "missing API key" in text)
    assert browser.execute("return document.getElementById('key-form').hidden") is False
    browser.get(f"{served.url}/reports/#key={ADMIN_KEY}")
    browser.wait_text("#reports", lambda text: "Personas" in text)
    names = [browser.attribute(e, "data-report") for e in browser.find_all("#reports li")]
    assert sorted(names) == sorted(["personas", RANKING])


@pytest.mark.slow
def test_the_ranking_report_plots_the_evaluation(served: Served, browser: Chromium) -> None:
    methods = served.ranking["methods"]
    browser.get(f"{served.url}/reports/{RANKING}#key={ADMIN_KEY}")
    browser.wait_text("#report-title", lambda text: text.startswith("Ranking evaluation"))
    for figure in ("ndcg", "hit-rate", "differences", "candidate-recall", "generator-recall"):
        assert browser.find_all(f"#report-body figure#{figure} svg.chart"), figure
    for figure, metric in (("ndcg", "ndcg@10"), ("hit-rate", "hr@10")):
        rows = marks(browser, f"#{figure} g.row")
        drawn = {row["label"]: (float(row["value"]), float(row["low"]), float(row["high"])) for row in rows}
        expected = {
            METHOD_LABELS[m]: (v[metric], v[f"{metric}_ci95_low"], v[f"{metric}_ci95_high"]) for m, v in methods.items()
        }
        assert drawn == expected, figure
        assert all(low <= value <= high for value, low, high in drawn.values()), figure
        assert all(row["width"] > 100 and row["height"] > 10 for row in rows), "a row was not drawn"
    # The point sits inside its whisker, on the scale of the axis.
    inside = browser.execute(
        """
        return [...document.querySelectorAll('#ndcg g.row')].map((row) => {
          const line = row.querySelector('line.ci'), point = row.querySelector('circle.point');
          const x = Number(point.getAttribute('cx'));
          return Number(line.getAttribute('x1')) <= x && x <= Number(line.getAttribute('x2'));
        });
        """
    )
    assert inside == [True] * len(methods)
    # Recall per generator adds up to the pipeline's candidate recall, and the bars show those shares.
    generators = served.ranking["generator_recall"]
    assert generators and sum(generators.values()) == pytest.approx(methods[PIPELINE]["candidate_recall"])
    bars = marks(browser, "#generator-recall g.row")
    assert {row["label"]: float(row["value"]) for row in bars} == generators
    sizes = browser.execute(
        "return [...document.querySelectorAll('#generator-recall g.row')].map("
        "r => [r.dataset.label, r.querySelector('rect.bar').getBoundingClientRect().width]);"
    )
    # One scale for the whole chart: a larger share never gets a shorter bar.
    for label, width in sizes:
        for other, other_width in sizes:
            if generators[label] > generators[other]:
                assert width >= other_width, (label, other)
    assert len(browser.find_all("#report-body table.metrics tbody tr")) == 3 * 3 + 2


@pytest.mark.slow
def test_the_persona_report_plots_sizes_centres_and_traits(served: Served, browser: Chromium) -> None:
    store = open_store(served.settings)
    try:
        model, report = load_model(store), load_report(store)
    finally:
        store.close()
    assert model is not None and report is not None
    browser.get(f"{served.url}/reports/personas#key={ADMIN_KEY}")
    browser.wait_text("#report-title", lambda text: text.startswith("Personas"))
    sizes = {row["label"]: float(row["value"]) for row in marks(browser, "#sizes g.row")}
    assert sizes == {
        f"{p.persona_id} · {p.name_en}": float(report["assigned"][str(p.persona_id)]) for p in model.personas
    }
    chosen = marks(browser, "#choice-of-k g.row")
    assert {row["label"] for row in chosen} == {f"k = {k}" for k in report["davies_bouldin_by_k"]}
    cells = marks(browser, "#centres g.cell")
    assert len(cells) == model.k * len(model.trait_names)
    by_cell = {(c["row"], c["column"]): float(c["value"]) for c in cells}
    for persona, centre in zip(model.personas, model.centres, strict=True):
        for trait, value in zip(model.trait_names, centre, strict=True):
            assert by_cell[(f"{persona.persona_id} · {persona.name_en}", trait)] == pytest.approx(value)
    assert all(c["width"] > 20 for c in cells)
    for persona in model.personas:
        traits = marks(browser, f"#traits-{persona.persona_id} g.row")
        assert [row["label"] for row in traits] == [t["trait"] for t in persona.top_traits]
