"""Direct uplift learning on simulated randomized logs where the truth is known, with outcomes recorded as visits
or revenue and no opens or clicks at all.

Customers carry one trait, segment gold or basic (the column `t_segment`). Message a adds 30 points of visit
probability for gold customers and nothing for basic ones; b adds 10 points for everyone; the baseline is 20%.
So "always a" is the best single message (+15 on average), and a then b by segment is better still (+20).
Logging is uniform over nothing, a and b, plus a 10% control group.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from services.common.traits import TraitSchema
from services.messages.model import ACTION_COLUMNS, VISITOR_COLUMNS, MessageModel, template_code
from services.messages.ope import LEARNED, NOTHING, evaluate_messages, learned_actions
from services.messages.replay import LoggedDecisions
from services.messages.reward import Reward
from services.messages.settings import MessageSettings
from services.messages.train import MessageTrainConfig, train_message_model

SCHEMA = TraitSchema.parse(json.dumps([{"name": "segment", "type": "category", "values": ["gold", "basic"]}]))
BASE, CONTROL = 0.2, 0.1
LIFT = {"a": (0.3, 0.0), "b": (0.1, 0.1)}  # (gold, basic)
SPEND = 100.0  # what a visit that buys spends; a few whales spend far more


def visit_probability(choice: np.ndarray, gold: np.ndarray) -> np.ndarray:
    lift_a = np.where(gold, LIFT["a"][0], LIFT["a"][1])
    lift_b = np.where(gold, LIFT["b"][0], LIFT["b"][1])
    return BASE + np.where(choice == 1, lift_a, np.where(choice == 2, lift_b, 0.0))


def randomized_log(n: int, seed: int) -> LoggedDecisions:
    rng = np.random.default_rng(seed)
    gold = rng.random(n) < 0.5
    V = np.full((n, len(VISITOR_COLUMNS) + 1), np.nan)
    V[:, -1] = np.where(gold, 1.0, 2.0)
    A = np.full((2 * n, len(ACTION_COLUMNS)), np.nan)
    A[:, 0], A[:, 2] = 1.0, 0.0
    A[0::2, 1], A[1::2, 1] = template_code("a"), template_code("b")
    control = rng.random(n) < CONTROL
    choice = np.where(control, 0, rng.integers(0, 3, n))
    propensity = np.where(choice == 0, CONTROL + (1 - CONTROL) / 3, (1 - CONTROL) / 3)
    visited = rng.random(n) < visit_probability(choice, gold)
    converted = visited & (rng.random(n) < 0.5)
    whale = rng.random(n) < 0.01
    revenue = np.where(converted, np.where(whale, 50 * SPEND, SPEND), 0.0)
    return LoggedDecisions(
        visitor_ids=[f"v{i}" for i in range(n)],
        recommendation_ids=[f"r{i}" for i in range(n)],
        channels=["email"] * n,
        send_at=np.arange(n, dtype=np.float64) * 60.0,
        V=V,
        propensity=propensity,
        action=np.where(choice == 0, -1, 2 * np.arange(n) + choice - 1),
        control=control,
        opened=np.zeros(n, dtype=bool),  # mail clients pre-fetch: no usable opens or clicks
        clicked=np.zeros(n, dtype=bool),
        attributed=np.zeros(n, dtype=bool),
        converted=converted,
        cand_owner=np.repeat(np.arange(n), 2),
        cand_template=["a", "b"] * n,
        cand_product=[None] * (2 * n),
        A=A,
        window_h=24.0 * 14,
        traits=SCHEMA,
        visited=visited,
        revenue=revenue,
    )


@pytest.fixture(scope="module")
def log() -> LoggedDecisions:
    return randomized_log(9000, seed=11)


def test_the_funnel_learns_nothing_without_opens_the_uplift_learner_learns_visits(log: LoggedDecisions) -> None:
    visit = Reward("visit")
    funnel = train_message_model(log, MessageTrainConfig(seed=2)).model
    assert (learned_actions(log, funnel, 0.001) < 0).all()  # uplift = P(open) ... = 0: "send nothing"

    result = train_message_model(log, MessageTrainConfig(seed=2, learner="uplift", reward=visit))
    model = result.model
    assert model.learner == "uplift" and set(model.stages) == {"treated", "baseline"}
    gold = log.V[:, -1] == 1.0
    chosen = np.array([log.cand_template[a] if a >= 0 else "-" for a in learned_actions(log, model, 0.02)])
    assert (chosen[gold] == "a").mean() > 0.9 and (chosen[~gold] == "b").mean() > 0.9
    # Calibrated against the control group: predicted mean uplift of the sends next to the measured one.
    metrics = result.metrics
    low, high = metrics["measured_uplift_ci95"]
    assert low <= metrics["predicted_uplift"] <= high
    assert abs(metrics["predicted_uplift"] - 0.125) < 0.03  # the truth: (0.15 + 0.10) / 2 over uniform a/b sends

    evaluation = evaluate_messages(log, model, min_uplift=0.02, reward=visit)
    values = {p.policy: p for p in evaluation.policies}
    truth = {NOTHING: BASE, "only:a": BASE + 0.15, "only:b": BASE + 0.10, LEARNED: BASE + 0.20}
    for name, value in truth.items():
        assert values[name].dr.ci_low <= value <= values[name].dr.ci_high, name
    comparison = evaluation.learned_vs_best_single
    assert comparison is not None and comparison.baseline == "only:a" and comparison.difference.ci_low > 0

    stored = MessageModel.from_bytes(model.to_bytes())
    assert stored.learner == "uplift" and stored.reward == visit
    np.testing.assert_allclose(
        stored.uplift(log.V[:20], log.A[:40], log.cand_owner[:40])[0],
        model.uplift(log.V[:20], log.A[:40], log.cand_owner[:40])[0],
    )


def test_a_capped_revenue_reward_gives_a_policy_and_an_estimate(log: LoggedDecisions) -> None:
    revenue = Reward("revenue", revenue_cap=3 * SPEND)
    model = train_message_model(log, MessageTrainConfig(seed=2, learner="uplift", reward=revenue)).model
    gold = log.V[:, -1] == 1.0
    chosen = np.array([log.cand_template[a] if a >= 0 else "-" for a in learned_actions(log, model, 1.0)])
    assert (chosen[gold] == "a").mean() > 0.8 and (chosen[~gold] == "b").mean() > 0.8
    evaluation = evaluate_messages(log, model, min_uplift=1.0, reward=revenue, send_cost=2.0)
    values = {p.policy: p for p in evaluation.policies}
    # Expected capped revenue: P(visit) * 0.5 * (0.99 * SPEND + 0.01 * cap), minus the send cost for sends.
    per_visit = 0.5 * (0.99 * SPEND + 0.01 * 3 * SPEND)
    assert values[NOTHING].dr.ci_low <= BASE * per_visit <= values[NOTHING].dr.ci_high
    only_a = (BASE + 0.15) * per_visit - 2.0
    assert values["only:a"].dr.ci_low <= only_a <= values["only:a"].dr.ci_high
    assert evaluation.to_json()["reward"] == "revenue capped at 300"


@pytest.mark.parametrize("reward", [Reward("visit"), Reward("conversion"), Reward("revenue", revenue_cap=300.0)])
def test_single_message_intervals_cover_the_true_arm_mean_in_93_percent_of_randomized_logs(reward: Reward) -> None:
    per_visit = {"visit": 1.0, "conversion": 0.5, "revenue": 0.5 * (0.99 * SPEND + 0.01 * 300.0)}[reward.kind]
    truth = {
        NOTHING: BASE * per_visit,
        "only:a": (BASE + 0.15) * per_visit,
        "only:b": (BASE + 0.10) * per_visit,
    }
    covered = {name: 0 for name in truth}
    repetitions = 120
    for seed in range(repetitions):
        evaluation = evaluate_messages(randomized_log(1500, seed=1000 + seed), None, reward=reward)
        for p in evaluation.policies:
            covered[p.policy] += p.dr.ci_low <= truth[p.policy] <= p.dr.ci_high
    for name, count in covered.items():
        assert count / repetitions >= 0.93, (name, count)


def test_reward_values_kinds_mix_cap_and_missing_outcomes() -> None:
    converted = np.array([True, False, True])
    visited = np.array([True, True, False])
    revenue = np.array([500.0, 0.0, 50.0])
    assert Reward().values(converted, visited, revenue).tolist() == [1.0, 0.0, 1.0]
    assert Reward("visit").values(converted, visited, revenue).tolist() == [1.0, 1.0, 0.0]
    assert Reward("revenue", revenue_cap=100).values(converted, visited, revenue).tolist() == [100.0, 0.0, 50.0]
    mix = Reward("mix", revenue_cap=100, conversion_weight=1, visit_weight=0.5, revenue_weight=0.01)
    assert mix.values(converted, visited, revenue).tolist() == [2.5, 0.5, 1.5]
    with pytest.raises(ValueError, match="visit outcomes"):
        Reward("visit").values(converted, np.zeros(0, dtype=bool), revenue)
    with pytest.raises(ValueError, match="one of"):
        Reward("clicks")  # type: ignore[arg-type]
    assert Reward.from_dict(Reward("revenue", revenue_cap=math.inf).to_dict()) == Reward("revenue")


def test_the_reward_and_learner_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECOMMEND_MESSAGES_REWARD", "mix")
    monkeypatch.setenv("RECOMMEND_MESSAGES_REWARD_VISIT_WEIGHT", "0.2")
    monkeypatch.setenv("RECOMMEND_MESSAGES_REWARD_REVENUE_CAP", "250000")
    monkeypatch.setenv("RECOMMEND_MESSAGES_LEARNER", "uplift")
    settings = MessageSettings()
    assert settings.learner == "uplift"
    assert settings.reward_spec() == Reward("mix", 250_000.0, 1.0, 0.2, 0.0)
    from services.cli.messages import chosen_reward

    assert chosen_reward("revenue", None, None) == dataclasses.replace(settings.reward_spec(), kind="revenue")
    assert chosen_reward(None, None, "visit=0.5,revenue=0.001").revenue_weight == 0.001
