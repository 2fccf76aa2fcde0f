"""The Done-when of issue #16 on the demo shop: a randomized CRM e-mail campaign (`simulate_campaign`) whose
customers carry CRM traits; the hidden `crm_segment` decides which of two e-mails brings a visitor back
(bargain hunters only react to the payday promo, trend seekers only to new arrivals, regulars to neither) and
nothing about it shows in browsing. Outcomes are visits and purchases only: no opens, no clicks.

With the traits as features, the learned policy (cross-fitted, since it is trained and scored on the same
log) beats every single-message policy by a paired DR interval that excludes zero; without them (the
ablation, same log) it does not beat the best single message. The figures are in docs/messages.md.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from services.common.settings import CommonSettings
from services.common.traits import TraitSchema
from services.demo.message_sim import (
    CAMPAIGN_TEMPLATES,
    CRM_TRAITS,
    NEW_ARRIVALS_EMAIL,
    PROMO_EMAIL,
    REACTS_TO,
    Campaign,
    CampaignConfig,
    simulate_campaign,
    write_campaign,
)
from services.messages.crossfit import cross_fit
from services.messages.ope import (
    LEARNED,
    NOTHING,
    Evaluation,
    evaluate_messages,
    greedy_actions,
    single_message_actions,
)
from services.messages.replay import LoggedDecisions, replay_decisions
from services.messages.reward import Reward
from services.messages.train import MessageTrainConfig, train_message_model
from services.offline.estimators import Estimate
from tests.conftest import REDIS_URL
from tests.messages.test_message_endpoints import drop_feast_rows
from tests.messages.test_message_logs import run_cli

END = datetime(2026, 11, 20, tzinfo=UTC)
VISIT = Reward("visit")
MIN_UPLIFT = 0.02


@pytest.fixture(scope="module")
def campaign() -> Campaign:
    return simulate_campaign(CampaignConfig(visitors=2000, seed=7, end=END))


def true_value(campaign: Campaign, data: LoggedDecisions, actions: np.ndarray, per_visit: float = 1.0) -> float:
    """The expected reward of a policy's actions (visit probability, times what a visit is worth)."""
    chosen = [data.cand_template[a] if a >= 0 else "none" for a in actions]
    truth = campaign.visit_probability
    return per_visit * float(np.mean([truth[r][t] for r, t in zip(data.recommendation_ids, chosen, strict=True)]))


def near(estimate: Estimate, truth: float) -> bool:
    """Within three standard errors: one fixed draw, so not the 95% interval (coverage over repetitions is
    tested in test_message_uplift.py)."""
    return abs(estimate.value - truth) <= 3 * estimate.se


def cross_fitted(campaign: Campaign, traits: TraitSchema) -> tuple[LoggedDecisions, Evaluation, np.ndarray]:
    data = replay_decisions(campaign.events, campaign.catalog, campaign.window_h, traits=traits)
    config = MessageTrainConfig(window_h=campaign.window_h, seed=7, learner="uplift", reward=VISIT)
    predictions = cross_fit(data, config, folds=3)
    evaluation = evaluate_messages(data, predictions, MIN_UPLIFT, reward=VISIT)
    return data, evaluation, greedy_actions(data, predictions.uplift, MIN_UPLIFT)


def test_with_crm_traits_the_learned_policy_beats_every_single_message_and_without_them_it_does_not(
    campaign: Campaign,
) -> None:
    data, evaluation, actions = cross_fitted(campaign, CRM_TRAITS)
    assert data.size == 4000 and not data.opened.any() and not data.clicked.any()  # no opens recorded
    assert evaluation.cross_fit_folds == 3
    policies = {p.policy: p for p in evaluation.policies}
    # Every estimate covers its policy's true value (the single messages' and the learned policy's own).
    for template in CAMPAIGN_TEMPLATES:
        value = true_value(campaign, data, single_message_actions(data, template))
        assert near(policies[f"only:{template}"].dr, value), template
    assert near(policies[LEARNED].dr, true_value(campaign, data, actions))
    # The learned policy sends each segment its own message.
    segments = np.array([campaign.segments[v] for v in data.visitor_ids])
    chosen = np.array([data.cand_template[a] if a >= 0 else "none" for a in actions])
    for segment in ("bargain_hunter", "trend_seeker"):
        assert (chosen[segments == segment] == REACTS_TO[segment]).mean() > 0.6, segment
    with_traits = evaluation.against_singles(LEARNED)
    assert {c.baseline for c in with_traits} == {f"only:{t}" for t in CAMPAIGN_TEMPLATES}
    assert all(c.difference.ci_low > 0 for c in with_traits), with_traits

    # The ablation: the same log without the trait columns. Behaviour does not reveal the segment.
    blind_data, blind, _ = cross_fitted(campaign, TraitSchema())
    assert blind_data.V.shape[1] == data.V.shape[1] - len(CRM_TRAITS.columns)
    best = blind.learned_vs_best_single
    assert best is not None and best.difference.ci_low <= 0  # no better than the best single message
    assert not all(c.difference.ci_low > 0 for c in blind.against_singles(LEARNED))


@pytest.mark.parametrize(
    ("reward", "min_uplift"),
    [(Reward("conversion"), 0.005), (Reward("revenue", revenue_cap=2_000_000.0), 2_000.0)],
)
def test_conversion_and_revenue_rewards_give_a_policy_and_an_estimate_on_the_demo(
    campaign: Campaign, reward: Reward, min_uplift: float
) -> None:
    """Trained on the first wave, scored on the second (held out by time, no cross-fitting needed)."""
    data = replay_decisions(campaign.events, campaign.catalog, campaign.window_h, traits=CRM_TRAITS)
    cut = float(np.median(data.send_at))
    first, second = data.subset(data.send_at < cut), data.subset(data.send_at >= cut)
    config = MessageTrainConfig(window_h=campaign.window_h, seed=7, learner="uplift", reward=reward)
    model = train_message_model(first, config).model
    assert model.reward == reward
    evaluation = evaluate_messages(second, model, min_uplift, reward=reward)
    policies = {p.policy: p for p in evaluation.policies}
    learned = policies[LEARNED]
    assert learned.send_share > 0 and learned.dr.ci_low < learned.dr.value < learned.dr.ci_high
    assert np.isfinite([learned.dr.ci_low, learned.dr.ci_high]).all() and learned.ess > 100
    assert policies[NOTHING].dr.value < policies[LEARNED].dr.ci_high
    if reward.kind == "conversion":  # a visit buys with probability 0.3 (CampaignConfig.buy_after_visit)
        nothing = true_value(campaign, second, np.full(second.size, -1), per_visit=0.3)
        assert near(policies[NOTHING].dr, nothing)


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> Iterator[CommonSettings]:
    made: CommonSettings = settings_factory(CommonSettings, redis_timeout_s=5.0)
    yield made
    drop_feast_rows(REDIS_URL, made.feast_project)


def test_the_campaign_files_evaluate_through_the_cli_with_a_crm_policy_file(
    settings: CommonSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = simulate_campaign(CampaignConfig(visitors=400, history_days=1, seed=3, end=END))
    files = write_campaign(small, tmp_path / "crm")
    with files["customers"].open() as handle:
        customers = list(csv.DictReader(handle))
    assert len(customers) == 400 and set(customers[0]) == {"visitor_id", *(t.name for t in CRM_TRAITS.traits)}
    assert {row["crm_segment"] for row in customers} == set(REACTS_TO)
    # The CRM's own rule as a policy file: the segment's message, nothing for regulars.
    policy = tmp_path / "crm_rule.csv"
    rule = {segment: template or "none" for segment, template in REACTS_TO.items()}
    policy.write_text(
        "visitor_id,action\n" + "".join(f"{c['visitor_id']},{rule[c['crm_segment']]}\n" for c in customers)
    )
    monkeypatch.setenv("SELARAS_TRAITS", str(files["traits"]))
    report = tmp_path / "ope.json"
    code, output = run_cli(
        monkeypatch, settings, "evaluate", "messages", str(files["events"]), "--catalog", str(files["catalog"]),
        "--reward", "visit", "--window-hours", "72", "--policy", str(policy), "--json", str(report),
    )  # fmt: skip
    assert code == 0, output
    body = orjson.loads(report.read_bytes())
    policies = {p["policy"]: p for p in body["policies"]}
    assert body["decisions"] == 800 and body["excluded"] == {}
    assert body["policy_files"]["file:crm_rule"]["missing_visitors"] == 0
    file_policy = policies["file:crm_rule"]
    data = replay_decisions(small.events, small.catalog, small.window_h, traits=CRM_TRAITS)
    rows = {(i, t): j for j, (i, t) in enumerate(zip(data.cand_owner.tolist(), data.cand_template, strict=True))}
    actions = np.array([rows.get((i, rule[small.segments[v]]), -1) for i, v in enumerate(data.visitor_ids)])
    truth = true_value(small, data, actions)
    low, high = file_policy["dr"][1], file_policy["dr"][2]
    assert abs(file_policy["dr"][0] - truth) <= 3 * (high - low) / (2 * 1.96)
    # The CRM rule sends each segment its message: it beats both single e-mails on this small log too.
    assert file_policy["dr"][0] > max(policies[f"only:{t}"]["dr"][0] for t in (PROMO_EMAIL, NEW_ARRIVALS_EMAIL))
