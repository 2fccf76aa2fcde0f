"""Uplift training and offline evaluation of message policies on synthetic logs where the truth is known.

Two messages, "a" and "b"; a visitor trait x in {0, 1}. Message a works on x = 1 visitors, b on x = 0.
A message can only cause a purchase through its own open -> click -> purchase funnel; everybody buys
"organically" with probability 0.1. The logging policy is uniform over {nothing, a, b} plus a control group.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.messages.model import ACTION_COLUMNS, VISITOR_COLUMNS, template_code
from services.messages.ope import LEARNED, NOTHING, evaluate_messages, greedy_actions
from services.messages.replay import LoggedDecisions
from services.messages.train import MessageTrainConfig, MessageTrainResult, train_message_model

ORGANIC = 0.1
OPEN, CLICK = 0.5, 0.5
CONTROL = 0.05


def p_buy_after_click(template: str, x: np.ndarray) -> np.ndarray:
    good = (x == 1) if template == "a" else (x == 0)
    return np.where(good, 0.8, 0.2)


def true_conversion(template: str | None, x: np.ndarray) -> np.ndarray:
    if template is None:
        return np.full(len(x), ORGANIC)
    attributed = OPEN * CLICK * p_buy_after_click(template, x)
    return 1 - (1 - ORGANIC) * (1 - attributed)


def synthetic_log(n: int, seed: int) -> LoggedDecisions:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, n)
    V = np.full((n, len(VISITOR_COLUMNS)), np.nan)
    V[:, 0] = x  # v_days_since_seen stands in for the trait
    A = np.full((2 * n, len(ACTION_COLUMNS)), np.nan)
    A[:, 0] = 1.0  # one trigger
    A[0::2, 1], A[1::2, 1] = template_code("a"), template_code("b")
    A[:, 2] = 0.0
    control = rng.random(n) < CONTROL
    choice = np.where(control, 0, rng.integers(0, 3, n))  # 0 nothing, 1 a, 2 b
    propensity = np.where(choice == 0, CONTROL + (1 - CONTROL) / 3, (1 - CONTROL) / 3)
    action = np.where(choice == 0, -1, 2 * np.arange(n) + choice - 1)
    opened = (choice > 0) & (rng.random(n) < OPEN)
    clicked = opened & (rng.random(n) < CLICK)
    p_buy = np.where(choice == 1, p_buy_after_click("a", x), p_buy_after_click("b", x))
    attributed = clicked & (rng.random(n) < p_buy)
    organic = rng.random(n) < ORGANIC
    return LoggedDecisions(
        visitor_ids=[f"v{i // 4}" for i in range(n)],  # four decisions per visitor
        recommendation_ids=[f"r{i}" for i in range(n)],
        channels=["push"] * n,
        send_at=np.arange(n, dtype=np.float64) * 60.0,
        V=V,
        propensity=propensity,
        action=action,
        control=control,
        opened=opened,
        clicked=clicked,
        attributed=attributed,
        converted=attributed | organic,
        cand_owner=np.repeat(np.arange(n), 2),
        cand_template=["a", "b"] * n,
        cand_product=[None] * (2 * n),
        A=A,
        window_h=24.0,
    )


@pytest.fixture(scope="module")
def trained() -> MessageTrainResult:
    return train_message_model(synthetic_log(12_000, seed=1), MessageTrainConfig(seed=1))


def test_the_uplift_model_learns_which_message_works_for_whom(trained: MessageTrainResult) -> None:
    result, model = trained, trained.model
    assert result.metrics["purchase"]["kind"] == "lightgbm" and result.metrics["purchase"]["valid_auc"] > 0.75
    probe = synthetic_log(4, seed=2)
    probe.V[:, 0] = [0, 1, 0, 1]
    uplift, _, baseline = model.uplift(probe.V, probe.A, probe.cand_owner)
    expected = np.array([true_conversion(t, np.array([x]))[0] - ORGANIC for x in (0, 1, 0, 1) for t in "ab"])
    assert np.allclose(uplift, expected, atol=0.03), (uplift, expected)
    assert np.allclose(baseline, ORGANIC, atol=0.03)
    # The control group check: predicted uplift of the sends next to what sends vs control measured.
    assert result.metrics["measured_uplift_ci95"][0] < result.metrics["predicted_uplift"]
    assert result.metrics["predicted_uplift"] < result.metrics["measured_uplift_ci95"][1]


def test_learned_policy_beats_the_best_single_message_with_intervals_that_cover_the_truth(
    trained: MessageTrainResult,
) -> None:
    model = trained.model
    held_out = synthetic_log(20_000, seed=4)
    x = held_out.V[:, 0]
    evaluation = evaluate_messages(held_out, model, min_uplift=0.001)
    by_name = {p.policy: p for p in evaluation.policies}
    truth = {
        LEARNED: float(np.mean(np.where(x == 1, true_conversion("a", x), true_conversion("b", x)))),
        NOTHING: ORGANIC,
        "only:a": float(np.mean(true_conversion("a", x))),
        "only:b": float(np.mean(true_conversion("b", x))),
    }
    for name, value in truth.items():
        policy = by_name[name]
        for estimate in (policy.ips, policy.snips, policy.dr):
            assert estimate.ci_low <= value <= estimate.ci_high, (name, estimate, value)
        assert 0 < policy.ess <= policy.matched + 1e-6  # equal weights: ESS = matched decisions
    assert by_name[LEARNED].send_share == 1.0 and by_name[NOTHING].matched == int((held_out.action < 0).sum())
    comparison = evaluation.learned_vs_best_single
    assert comparison is not None and comparison.baseline in ("only:a", "only:b")
    true_gain = truth[LEARNED] - truth[comparison.baseline]
    assert comparison.difference.ci_low > 0  # the learned policy beats the best single message
    assert comparison.difference.ci_low <= true_gain <= comparison.difference.ci_high
    # Pairing makes the difference far tighter than the two policies' own intervals.
    own = by_name[LEARNED].dr.ci_high - by_name[LEARNED].dr.ci_low
    assert comparison.difference.ci_high - comparison.difference.ci_low < own


def test_interval_coverage_over_repeated_logs() -> None:
    """95% intervals of the three estimators cover the true value of "always a" about 95% of the time."""
    repetitions, covered = 200, {"ips": 0, "snips": 0, "dr": 0}
    for seed in range(repetitions):
        data = synthetic_log(1_000, seed=100 + seed)
        truth = float(np.mean(true_conversion("a", data.V[:, 0])))
        policy = next(p for p in evaluate_messages(data, None).policies if p.policy == "only:a")
        for name in covered:
            estimate = getattr(policy, name)
            covered[name] += estimate.ci_low <= truth <= estimate.ci_high
    for name, count in covered.items():
        assert 0.90 <= count / repetitions <= 0.99, (name, count)


def test_greedy_actions_pick_the_best_candidate_above_the_threshold() -> None:
    data = synthetic_log(3, seed=5)
    scores = np.array([0.01, 0.02, 0.0005, 0.0001, 0.03, -0.01])
    assert greedy_actions(data, scores, 0.001).tolist() == [1, -1, 4]
    with pytest.raises(ValueError, match="positive propensity"):
        data.propensity[0] = 0.0
        evaluate_messages(data, None)
    assert math.isclose(synthetic_log(8, seed=6).propensity.max(), CONTROL + (1 - CONTROL) / 3)
