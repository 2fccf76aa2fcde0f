"""Offline ranking evaluation: the protocols' splits, the popularity baselines' windows, and a run of
`selaras evaluate ranking` on the demo world (served pipeline against the baselines)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from services.cli import app as cli
from services.common.events import EventType
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings
from services.recommend.training.evaluation import (
    METHODS,
    PIPELINE,
    EvalConfig,
    RankingEvaluator,
    _Popularity,
    split_queries,
)
from services.recommend.training.event_columns import LoggedEvent
from services.recommend.training.train import TrainConfig
from tests.conftest import REDIS_URL, SessionWorld
from tests.factories import BASE_TIME, make_event

PRODUCTS = {f"p{i}" for i in range(10)}


def event(visitor: str, item: str, hours: float, kind: str = "product_view", **extra: Any) -> LoggedEvent:
    return LoggedEvent.of(
        make_event(
            visitor_id=visitor,
            item_id=item,
            type=kind,
            timestamp=(BASE_TIME + timedelta(hours=hours)).isoformat(),
            **extra,
        )
    )


def history() -> list[LoggedEvent]:
    events = [
        event("ana", "p1", 1),
        event("ana", "p2", 2),
        event("ana", "p3", 3, "add_to_cart"),
        event("ana", "p4", 4),
        event("ana", "p5", 5),
        event("budi", "p1", 1.5),
        event("budi", "p6", 6),  # two views: skipped and counted
        event("citra", "p7", 2.5),
        event("citra", "zz", 3.5),  # not in the catalog: not an interaction
        event("citra", "p8", 7),
        event("citra", "p9", 8),
        event("dewi", "p2", 0.5),
        event("dewi", "p2", 9),
        event("dewi", "p3", 10),
    ]
    return sorted(events, key=lambda e: e.ts)


def targets(queries: list[Any]) -> list[tuple[str, str]]:
    return [(q.visitor_id, q.target) for q in queries]


def test_leave_last_out_holds_out_the_last_and_validates_on_the_one_before() -> None:
    split = split_queries(history(), PRODUCTS, EvalConfig())
    assert sorted(targets(split.test)) == [("ana", "p5"), ("citra", "p9"), ("dewi", "p3")]
    assert sorted(targets(split.validation)) == [("ana", "p4"), ("citra", "p8"), ("dewi", "p2")]
    # Earlier views train; a visitor who is not evaluated trains with everything (budi).
    assert sorted(targets(split.train)) == [
        ("ana", "p1"),
        ("ana", "p2"),
        ("budi", "p1"),
        ("budi", "p6"),
        ("citra", "p7"),
        ("dewi", "p2"),
    ]
    assert split.counts["visitors_skipped_few_interactions"] == 1
    assert split.counts["visitors_evaluated"] == 3
    # Every training query precedes its visitor's validation query, which precedes the test query.
    cut = {q.visitor_id: q.ts for q in split.validation}
    assert all(q.ts < cut[q.visitor_id] for q in split.train if q.visitor_id in cut)
    assert all(q.ts > cut[q.visitor_id] for q in split.test)


def test_training_on_behaviour_adds_carts_and_purchases_with_their_grades() -> None:
    split = split_queries(history(), PRODUCTS, EvalConfig(train_on="behaviour"))
    carts = [q for q in split.train if q.target == "p3" and q.visitor_id == "ana"]
    assert len(carts) == 1 and carts[0].grade == 2


def test_time_protocol_trains_before_the_cutoff_and_tests_after() -> None:
    events = history()
    cutoff = (BASE_TIME + timedelta(hours=4.5)).timestamp()
    split = split_queries(events, PRODUCTS, EvalConfig(protocol="time", cutoff=cutoff))
    assert all(q.ts < cutoff for q in split.train + split.validation)
    assert sorted(targets(split.test)) == [
        ("ana", "p5"),
        ("citra", "p8"),
        ("citra", "p9"),
        ("dewi", "p2"),
        ("dewi", "p3"),
    ]
    assert split.counts["cutoff"] == int(cutoff)
    # Default cut-off: the last 20% of the target interactions are after it.
    default = split_queries(events, PRODUCTS, EvalConfig(protocol="time"))
    assert 1 <= len(default.test) <= 3


def test_visitor_cap_and_click_target() -> None:
    capped = split_queries(history(), PRODUCTS, EvalConfig(max_visitors=2, seed=3))
    assert capped.counts["visitors_evaluated"] == 2 and len(capped.test) == 2
    clicks = [event("eko", f"p{i}", i, "click", recommendation_id="rec") for i in range(1, 4)]
    clicks.append(event("eko", "p4", 5, "click"))  # not on a recommendation: not an interaction
    split = split_queries(sorted(history() + clicks, key=lambda e: e.ts), PRODUCTS, EvalConfig(target="click"))
    assert targets(split.test) == [("eko", "p3")]


def test_popularity_windows_count_only_the_past() -> None:
    index = {f"p{i}": i for i in range(4)}
    events = [event("x", "p1", h) for h in (0, 1, 2)] + [event("x", "p2", 30), event("x", "p3", 200, "purchase")]
    popularity = _Popularity(sorted(events, key=lambda e: e.ts), EventType.PRODUCT_VIEW, index, 4)
    popularity.advance((BASE_TIME + timedelta(hours=31)).timestamp())
    assert popularity.total.tolist() == [0, 3, 1, 0]
    assert popularity.windows["popular_24h"].tolist() == [0, 0, 1, 0]
    assert popularity.windows["popular_7d"].tolist() == [0, 3, 1, 0]
    assert int(np.argmax(popularity.scores("popular"))) == 1
    assert int(np.argmax(popularity.scores("popular_24h"))) == 2
    popularity.advance((BASE_TIME + timedelta(hours=300)).timestamp())
    assert popularity.windows["popular_7d"].tolist() == [0, 0, 0, 0]
    assert popularity.behaviour.tolist() == [0, 3, 1, 1]  # the purchase breaks ties, it is not a view


@pytest.mark.slow
def test_cli_ranks_held_out_views_with_the_pipeline_and_the_baselines(world: SessionWorld, tmp_path: Path) -> None:
    settings = world.settings
    out = tmp_path / "ranking.json"
    env = {
        "REDIS_URL": REDIS_URL,
        "SELARAS_NAMESPACE": settings.namespace,
        "SELARAS_FEAST_PROJECT": settings.feast_project,
        "SELARAS_ENVIRONMENT": "test",
        "SELARAS_DATA_DIR": str(settings.data_dir),
    }
    args = ["evaluate", "ranking", "--data-dir", str(settings.data_dir), "--max-visitors", "80"]
    # No HTML report: it would be stored in the shared world (tests/reports/ checks the report, on a copy).
    args += ["--max-queries", "2000", "--out", str(out), "--no-html-report"]
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "NDCG@10" in result.output and "cand. recall" in result.output
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert set(methods) == set(METHODS)
    assert report["counts"]["visitors_evaluated"] == 80 and report["counts"]["test_queries"] == 80
    for name, row in methods.items():
        assert row["queries"] == 80
        for k in (5, 10, 20):
            assert 0 <= row[f"ndcg@{k}"] <= row[f"hr@{k}"] <= 1, name
            assert row[f"mrr@{k}"] <= row[f"ndcg@{k}"] + 1e-12, name
        assert row["hr@5"] <= row["hr@10"] <= row["hr@20"]
        # A held-out item that no candidate generator proposed is a miss.
        assert row["hr@20"] <= row["candidate_recall"] + 1e-12, name
        assert 0 < row["coverage"] <= 1
    pipeline = methods[PIPELINE]
    for baseline in ("popular", "popular_24h", "popular_7d"):
        assert pipeline["ndcg@10"] > methods[baseline]["ndcg@10"], (baseline, methods)
    assert pipeline["coverage"] > methods["popular"]["coverage"]  # personal lists differ between visitors
    assert set(report["comparisons"]) == set(METHODS) - {PIPELINE}
    print({name: round(row["ndcg@10"], 4) for name, row in methods.items()})


@pytest.mark.slow
def test_time_protocol_on_the_world(world: SessionWorld) -> None:
    settings = RecommendSettings(
        data_dir=world.settings.data_dir,
        redis_url=REDIS_URL,
        namespace=world.settings.namespace,
        feast_project=world.settings.feast_project,
        environment="test",
        redis_timeout_s=5.0,
    )
    repository = RecommendRepository.open(settings)
    try:
        config = EvalConfig(protocol="time", max_visitors=60, max_test_queries=150, train=TrainConfig(max_queries=1500))
        result = RankingEvaluator(repository, settings, config).run()
    finally:
        repository.close()
    counts = result.counts
    assert 0 < counts["test_queries"] <= 150
    assert counts["train_queries"] + counts["validation_queries"] > counts["test_queries"]
    assert counts["cutoff"] > 0
    # Point in time: the events after the cut-off are the test, never training.
    assert result.methods[PIPELINE]["queries"] == counts["test_queries"]
    assert result.methods[PIPELINE]["ndcg@10"] > result.methods["popular"]["ndcg@10"]
