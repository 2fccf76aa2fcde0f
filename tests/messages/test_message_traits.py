"""Customer traits as message-model features: the model learns from a category trait (LightGBM categorical with
the schema's code table) and keeps its schema through storage; on real Redis and Feast, serving builds the same
decision row as the training replay, and a customer known only from traits is not an unknown visitor."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from services.common.catalog import CatalogItem
from services.common.clock import FixedClock
from services.common.settings import CommonSettings
from services.common.traits import TraitSchema
from services.demo.shop import generate_shop
from services.features.aggregations import SegmentRules
from services.features.item_cache import build_snapshot
from services.messages.model import (
    ACTION_COLUMNS,
    VISITOR_COLUMNS,
    MessageModel,
    Stage,
    VisitorView,
    decision_vector,
    template_code,
)
from services.messages.ope import learned_actions
from services.messages.replay import LoggedDecisions, replay_decisions
from services.messages.repository import MessageRepository
from services.messages.reward import Reward
from services.messages.schemas import MessageRequest
from services.messages.service import MessageService
from services.messages.settings import MessageSettings
from services.messages.train import MessageTrainConfig, train_message_model
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings
from tests.conftest import REDIS_URL
from tests.factories import make_event, make_item
from tests.messages.test_message_endpoints import drop_feast_rows

SCHEMA = TraitSchema.parse(
    json.dumps(
        [
            {"name": "segment", "type": "category", "values": ["gold", "basic"]},
            {"name": "newbie", "type": "boolean"},
            {"name": "signup_date", "type": "date"},
        ]
    )
)
NOW = datetime(2026, 11, 26, 2, tzinfo=UTC)


def before(**delta: float) -> str:
    return (NOW - timedelta(**delta)).isoformat()


def trait_log(n: int, seed: int) -> LoggedDecisions:
    """Message a works only on `gold` customers, b only on `basic` ones; behaviour columns are all missing,
    so only the trait can tell them apart. Uniform logging over nothing, a and b."""
    rng = np.random.default_rng(seed)
    gold = rng.random(n) < 0.5
    V = np.full((n, len(VISITOR_COLUMNS) + len(SCHEMA.columns)), np.nan)
    V[:, len(VISITOR_COLUMNS)] = np.where(gold, 1.0, 2.0)  # t_segment: the schema's codes
    A = np.full((2 * n, len(ACTION_COLUMNS)), np.nan)
    A[:, 0], A[:, 2] = 1.0, 0.0
    A[0::2, 1], A[1::2, 1] = template_code("a"), template_code("b")
    choice = rng.integers(0, 3, n)  # 0 nothing, 1 a, 2 b
    works = np.where(choice == 1, gold, np.where(choice == 2, ~gold, False))
    opened = (choice > 0) & (rng.random(n) < 0.5)
    clicked = opened & (rng.random(n) < 0.5)
    attributed = clicked & (rng.random(n) < np.where(works, 0.9, 0.05))
    return LoggedDecisions(
        visitor_ids=[f"v{i}" for i in range(n)],
        recommendation_ids=[f"r{i}" for i in range(n)],
        channels=["email"] * n,
        send_at=np.arange(n, dtype=np.float64) * 60.0,
        V=V,
        propensity=np.full(n, 1 / 3),
        action=np.where(choice == 0, -1, 2 * np.arange(n) + choice - 1),
        control=np.zeros(n, dtype=bool),
        opened=opened,
        clicked=clicked,
        attributed=attributed,
        converted=attributed | (rng.random(n) < 0.05),
        cand_owner=np.repeat(np.arange(n), 2),
        cand_template=["a", "b"] * n,
        cand_product=[None] * (2 * n),
        A=A,
        window_h=24.0,
        traits=SCHEMA,
    )


def test_the_model_learns_which_message_each_trait_segment_answers_and_keeps_its_schema() -> None:
    data = trait_log(6000, seed=3)
    model = train_message_model(data, MessageTrainConfig(seed=3, min_data_in_leaf=20)).model
    assert model.traits == SCHEMA and model.metrics["traits"] == ["segment", "newbie", "signup_date"]
    actions = learned_actions(data, model, 0.0)
    chosen = np.array([data.cand_template[a] if a >= 0 else "-" for a in actions])
    gold = data.V[:, len(VISITOR_COLUMNS)] == 1.0
    assert (chosen[gold] == "a").mean() > 0.9 and (chosen[~gold] == "b").mean() > 0.9
    stored = MessageModel.from_bytes(model.to_bytes())
    assert stored.traits == SCHEMA and stored.features == model.features
    np.testing.assert_allclose(
        stored.uplift(data.V[:50], data.A[:100], data.cand_owner[:100])[0],
        model.uplift(data.V[:50], data.A[:100], data.cand_owner[:100])[0],
    )
    # Without the trait column (the ablation) both segments look the same: one message for everybody.
    blind_data = dataclasses.replace(data, V=data.V[:, : len(VISITOR_COLUMNS)], traits=TraitSchema())
    blind = train_message_model(blind_data, MessageTrainConfig(seed=3, min_data_in_leaf=20)).model
    blind_chosen = {data.cand_template[a] if a >= 0 else "-" for a in learned_actions(blind_data, blind, 0.0)}
    assert len(blind_chosen) == 1


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> Iterator[CommonSettings]:
    made: CommonSettings = settings_factory(CommonSettings, redis_timeout_s=5.0)
    yield made
    drop_feast_rows(REDIS_URL, made.feast_project)


def test_served_decision_rows_with_traits_equal_the_replayed_ones(settings: CommonSettings) -> None:
    catalog: list[CatalogItem] = [
        make_item(item_id="p-a", price=80_000, original_price=100_000, created_at=before(days=90)),
        *generate_shop(seed=3, n_products=10, now=NOW).messages,
    ]
    traits = {"segment": "gold", "newbie": False, "signup_date": "2026-11-16", "first_name": "Sari"}
    events = [
        make_event(visitor_id="v", type="profile_update", item_id=None, price=None, timestamp=before(days=20),
                   properties={**traits, "consent_marketing_push": True}),
        make_event(visitor_id="v", item_id="p-a", timestamp=before(hours=5)),
        make_event(visitor_id="v", type="add_to_cart", item_id="p-a", timestamp=before(hours=4)),
        make_event(visitor_id="crm-only", type="profile_update", item_id=None, price=None, timestamp=before(days=2),
                   properties={"segment": "basic", "consent_marketing_push": True, "consent_marketing_email": True}),
        make_event(visitor_id="nobody", type="profile_update", item_id=None, price=None, timestamp=before(days=2),
                   properties={"consent_marketing_push": True}),  # consent is not a trait: still unknown
    ]  # fmt: skip
    profile = ProfileRepository.open(settings)
    try:
        profile.upsert_catalog(catalog)
        ingest = IngestService(profile, traits=SCHEMA)
        assert ingest.trait_errors(events) == []
        ingest.ingest(events)
        aggregator = Aggregator(
            profile, SegmentRules(), settings.consent_defaults(), offline_rows=False, clock=FixedClock(NOW)
        )
        while aggregator.run_once(1000).events:
            pass
    finally:
        profile.close()
    stages = {"open": Stage(None, 0.3), "click": Stage(None, 0.5), "purchase": Stage(None, 0.5)}
    model = MessageModel("const", 0.0, {**stages, "baseline": Stage(None, 0.2)}, 24.0, traits=SCHEMA)
    recommend = RecommendRepository.open(RecommendSettings(**settings.model_dump()))
    try:
        snapshot = build_snapshot(catalog, {}, {}, {}, now=NOW.timestamp())
        repository = MessageRepository(recommend)
        service = MessageService(repository, lambda: snapshot, MessageSettings(control_rate=0.0, exploration=0.0))
        service.use_model(model)
        answer = service.decide(MessageRequest(visitor_id="v", channel="push", now=NOW))
        crm_only = service.decide(MessageRequest(visitor_id="crm-only", channel="push", now=NOW))
        never_seen = service.decide(MessageRequest(visitor_id="nobody", channel="push", now=NOW))
        assert answer["action"] == "send"
        recommend.flush()
        logged = list(recommend.logged_events())
        # A direct-uplift model on revenue explains itself in the reward's units.
        treated_and_baseline = {"treated": Stage(None, 5000.0), "baseline": Stage(None, 1000.0)}
        revenue = MessageModel("rev", 0.0, treated_and_baseline, 24.0, traits=SCHEMA, learner="uplift",
                               reward=Reward("revenue"))  # fmt: skip
        service.use_model(revenue)
        by_revenue = service.decide(MessageRequest(visitor_id="crm-only", channel="email", now=NOW, dry_run=True))
        online = dict(zip(["v", "crm-only"], repository.visitor_rows(["v", "crm-only"]), strict=True))
        stored = dict(zip(["v", "crm-only"], repository.visitor_traits(["v", "crm-only"]), strict=True))
    finally:
        recommend.close()
    # The CRM-only customer (no behaviour, so no online row) gets a message; a visitor nobody told us about does not.
    assert crm_only["action"] == "send" and online["crm-only"] is None
    assert never_seen["reason"] == "unknown_visitor"
    assert by_revenue["action"] == "send" and by_revenue["score"] == 4000.0
    assert "expected uplift +4,000 revenue (baseline 1,000)" in by_revenue["reasons"]
    assert stored["v"] == traits
    data = replay_decisions(logged, catalog, traits=SCHEMA)
    assert data.visitor_ids == ["v", "crm-only"] and data.V.shape[1] == len(VISITOR_COLUMNS) + 3
    for i, (visitor_id, given) in enumerate([("v", answer), ("crm-only", crm_only)]):
        view = VisitorView.from_row(visitor_id, online[visitor_id], stored[visitor_id])
        send_at = datetime.fromisoformat(given["send_at"]).timestamp()
        served = decision_vector(view, NOW.timestamp(), send_at, "push", SCHEMA)
        np.testing.assert_allclose(data.V[i], served, rtol=1e-9, equal_nan=True)
    assert list(data.V[0, -3:]) == [1.0, 0.0, 10 + 2 / 24]  # gold = code 1, not a newbie, signed up 10 d 2 h ago
    assert data.V[1, -3] == 2.0 and np.isnan(data.V[1, -2:]).all()  # basic; newbie and sign-up date unknown
