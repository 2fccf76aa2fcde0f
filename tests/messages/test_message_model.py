"""Message model data on real Redis and Feast: serving and replayed features agree; a simulation logs
decisions the CLI can train on and evaluate."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from services.common.catalog import CatalogItem
from services.common.clock import FixedClock
from services.common.events import Event
from services.common.settings import CommonSettings
from services.demo.files import read_jsonl
from services.demo.message_sim import MessageSimConfig, simulate_messages
from services.demo.shop import generate_shop
from services.features.aggregations import SegmentRules
from services.features.item_cache import build_snapshot
from services.messages.model import VisitorView, action_vector, visitor_vector
from services.messages.replay import replay_decisions
from services.messages.repository import MessageRepository
from services.messages.schemas import MessageRequest
from services.messages.service import MessageService
from services.messages.settings import MessageSettings
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings
from tests.conftest import REDIS_URL
from tests.factories import make_event, make_item
from tests.messages.test_message_endpoints import drop_feast_rows

NOW = datetime(2026, 11, 26, 2, tzinfo=UTC)  # payday window, 09:00 in Jakarta


def before(**delta: float) -> str:
    return (NOW - timedelta(**delta)).isoformat()


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> Iterator[CommonSettings]:
    made: CommonSettings = settings_factory(CommonSettings, redis_timeout_s=5.0)
    yield made
    drop_feast_rows(REDIS_URL, made.feast_project)


def test_replayed_features_equal_the_features_served_from_feast(settings: CommonSettings) -> None:
    catalog: list[CatalogItem] = [
        make_item(item_id="p-a", price=80_000, original_price=100_000, created_at=before(days=90)),
        make_item(item_id="p-b", category="kecantikan", price=45_000, created_at=before(days=3)),
        *generate_shop(seed=3, n_products=10, now=NOW).messages,
    ]
    events = [
        make_event(visitor_id="v", type="profile_update", item_id=None, price=None, timestamp=before(days=20),
                   properties={"first_name": "Sari", "consent_marketing_push": True}),
        make_event(visitor_id="v", item_id="p-a", timestamp=before(days=6)),
        make_event(visitor_id="v", type="add_to_cart", item_id="p-a", timestamp=before(days=6, minutes=-2)),
        make_event(visitor_id="v", type="purchase", item_id="p-a", timestamp=before(days=6, minutes=-4)),
        make_event(visitor_id="v", item_id="p-b", timestamp=before(hours=5)),
        make_event(visitor_id="v", type="add_to_cart", item_id="p-b", timestamp=before(hours=4)),
    ]  # fmt: skip
    profile = ProfileRepository.open(settings)
    try:
        profile.upsert_catalog(catalog)
        IngestService(profile).ingest(events)
        aggregator = Aggregator(
            profile, SegmentRules(), settings.consent_defaults(), offline_rows=False, clock=FixedClock(NOW)
        )
        while aggregator.run_once(1000).events:
            pass
    finally:
        profile.close()
    recommend = RecommendRepository.open(RecommendSettings(**settings.model_dump()))
    try:
        snapshot = build_snapshot(catalog, {}, {}, {}, now=NOW.timestamp())
        repository = MessageRepository(recommend)
        service = MessageService(repository, lambda: snapshot, MessageSettings(control_rate=0.0, exploration=0.0))
        answer = service.decide(MessageRequest(visitor_id="v", channel="push", now=NOW))
        assert answer["action"] == "send"
        recommend.flush()
        logged = list(recommend.logged_events())
        online = repository.visitor_rows(["v"])[0]
    finally:
        recommend.close()
    data = replay_decisions(logged, catalog)
    assert data.size == 1 and data.action[0] >= 0
    view = VisitorView.from_row("v", online)
    send_at = datetime.fromisoformat(answer["send_at"]).timestamp()
    served_v = visitor_vector(view, NOW.timestamp(), send_at, "push")
    message = answer["message"]
    product = snapshot.index[answer["product"]["item_id"]] if answer["product"] else -1
    served_a = action_vector(view, message["trigger"], message["item_id"], product, snapshot, NOW.timestamp())
    np.testing.assert_allclose(data.V[0], served_v, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(data.A[data.action[0]], served_a, rtol=1e-9, equal_nan=True)
    assert not np.isnan(served_v).all() and served_v[12] == 1.0  # one item in the cart


@pytest.mark.slow
def test_simulated_decisions_train_and_evaluate_through_the_cli(
    settings: CommonSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = 0.1
    config = MessageSimConfig(
        visitors=150,
        history_days=6,
        message_days=5,
        seed=5,
        end=datetime(2026, 11, 29, 12, tzinfo=UTC),
        policy=MessageSettings(win_back_after_days=3.0, control_rate=control),
    )
    result = simulate_messages(settings, config, out_dir=tmp_path / "out")
    assert result.logged > 100 and 0 < result.sent < result.logged
    assert {"send", "no_consent", "control_group", "exploration"} <= set(result.answers)

    events = [Event.model_validate(row) for row in read_jsonl(result.files["events"])]
    catalog = [CatalogItem.model_validate(row) for row in read_jsonl(result.files["catalog"])]
    data = replay_decisions(events, catalog)
    assert data.size == result.logged
    # Cold start: uniform over "nothing" and the k eligible messages, plus the control group on "nothing".
    k = np.bincount(data.cand_owner, minlength=data.size)
    uniform = (1 - control) / (k + 1)
    np.testing.assert_allclose(data.propensity, np.where(data.action >= 0, uniform, control + uniform), atol=1e-5)
    opened = {e.recommendation_id for e in events if e.type.value == "message_open"}
    assert int(data.opened.sum()) == len(opened) > 0
    triggers = Counter(e.properties.get("trigger") for e in events if e.type.value == "message_sent")
    assert len([t for t in triggers if t]) >= 5  # most triggers fire in the simulation

    monkeypatch.setenv("SELARAS_NAMESPACE", settings.namespace)
    monkeypatch.setenv("SELARAS_FEAST_PROJECT", settings.feast_project)
    monkeypatch.setenv("REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("SELARAS_REDIS_TIMEOUT_S", "5")
    monkeypatch.setenv("COLUMNS", "200")
    from services.cli import app

    runner = CliRunner()
    trained = runner.invoke(app, ["train-messages", "--data-dir", str(settings.data_dir)])
    assert trained.exit_code == 0, trained.output
    assert "message model msg-" in trained.output and "control group" in trained.output
    report = tmp_path / "ope.json"
    evaluated = runner.invoke(
        app,
        [
            "evaluate",
            "messages",
            str(result.files["events"]),
            "--data-dir",
            str(settings.data_dir),
            "--json",
            str(report),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "learned" in evaluated.output and "send_nothing" in evaluated.output
    # Scored on the decisions it learned from: the command says so and points to --cross-fit.
    assert "its estimate is optimistic" in " ".join(evaluated.output.split())
    body = json.loads(report.read_text())
    policies = {p["policy"]: p for p in body["policies"]}
    assert body["decisions"] == data.size and body["model_version"].startswith("msg-")
    assert policies["send_nothing"]["matched"] == int((data.action < 0).sum())
    assert policies["learned"]["send_share"] > 0.5 and policies["learned"]["ess"] > 10
    for name, policy in policies.items():
        low, high = policy["dr"][1], policy["dr"][2]
        assert low <= policy["dr"][0] <= high, name
    assert body["learned_vs_best_single"]["baseline"].startswith("only:")
