"""Exploration: the logged propensities are the exact probabilities of the placements the policy made."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from services.recommend.ranking.exploration import (
    Exploration,
    exploration_for,
    explore,
    sequential_probabilities,
    softmax_weights,
)
from services.recommend.repository import RecommendRepository
from services.recommend.schemas import RecommendRequest, RequestContext, SlotRequest
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from tests.conftest import REDIS_URL, SessionWorld, clean_namespace

SCORES = np.array([2.0, 1.4, 1.0, 0.2, -0.5])


def plackett_luce(scores: np.ndarray, slate: tuple[int, ...], temperature: float) -> float:
    """The textbook probability of an ordered slate under sampling without replacement ∝ exp(s/T)."""
    weights = np.exp(scores / temperature)
    left = list(range(len(scores)))
    probability = 1.0
    for row in slate:
        probability *= weights[row] / weights[left].sum()
        left.remove(row)
    return probability


def epsilon_greedy_slate(n: int, slate: tuple[int, ...], epsilon: float) -> float:
    left = list(range(n))
    probability = 1.0
    for row in slate:
        probability *= (1 - epsilon) * (row == left[0]) + epsilon / len(left)
        left.remove(row)
    return probability


@pytest.mark.parametrize(
    "policy",
    [Exploration(mode="softmax", temperature=0.7), Exploration(mode="epsilon_greedy", epsilon=0.3)],
    ids=["softmax", "epsilon"],
)
def test_slate_frequencies_match_the_product_of_logged_propensities(policy: Exploration) -> None:
    rng = np.random.default_rng(3)
    draws = 10_000
    seen: Counter[tuple[int, ...]] = Counter()
    logged: dict[tuple[int, ...], float] = {}
    for _ in range(draws):
        placement = explore(SCORES, 3, policy, rng)
        slate = tuple(int(i) for i in placement.order)
        seen[slate] += 1
        logged[slate] = float(np.prod(placement.propensities))
        assert placement.pool == len(SCORES)
    for slate, count in seen.items():
        if policy.mode == "softmax":
            exact = plackett_luce(SCORES, slate, policy.temperature)
        else:
            exact = epsilon_greedy_slate(len(SCORES), slate, policy.epsilon)
        assert logged[slate] == pytest.approx(exact, rel=1e-9)
        # Binomial tolerance: 4.5 standard deviations (60 slates, so no false alarm in practice).
        assert abs(count / draws - exact) <= 4.5 * math.sqrt(exact * (1 - exact) / draws) + 1e-4, slate
    assert sum(seen.values()) == draws


@pytest.mark.parametrize(
    "policy",
    [
        Exploration(mode="softmax", temperature=0.3),
        Exploration(mode="epsilon_greedy", epsilon=0.2),
        Exploration(mode="softmax", temperature=2.0, top_n=3),
        Exploration(),
    ],
)
def test_choice_probabilities_sum_to_one_at_every_position(policy: Exploration) -> None:
    for prefix_length in range(3):
        for prefix in itertools.permutations(range(len(SCORES)), prefix_length):
            total = sum(
                sequential_probabilities(SCORES, [*prefix, row], policy)[-1]
                for row in range(len(SCORES))
                if row not in prefix
            )
            # A prefix the policy cannot produce leaves nothing to distribute only when it used an
            # item outside the pool; every prefix drawn from the pool sums to one.
            pool = len(SCORES) if policy.top_n is None else policy.top_n
            if all(row < pool for row in prefix):
                assert total == pytest.approx(1.0)


def test_off_keeps_the_ranked_list_and_top_n_bounds_the_pool() -> None:
    rng = np.random.default_rng(0)
    off = explore(SCORES, 3, Exploration(), rng)
    assert off.order.tolist() == [0, 1, 2]
    assert off.propensities.tolist() == [1.0, 1.0, 1.0]
    bounded = Exploration(mode="epsilon_greedy", epsilon=1.0, top_n=3)
    rows = {int(r) for _ in range(300) for r in explore(SCORES, 2, bounded, rng).order}
    assert rows == {0, 1, 2}
    assert explore(SCORES, 2, bounded, rng).pool == 3
    # Probabilities of what the policy could not have placed are zero, not an error.
    assert sequential_probabilities(SCORES, [4], bounded).tolist() == [0.0]


def test_pinned_rows_keep_their_places_with_probability_one() -> None:
    rng = np.random.default_rng(1)
    policy = Exploration(mode="softmax", temperature=5.0)
    for _ in range(200):
        placement = explore(SCORES, 4, policy, rng, fixed=2)
        assert placement.order[:2].tolist() == [0, 1]
        assert placement.propensities[:2].tolist() == [1.0, 1.0]
        assert 0 < placement.propensities[2] < 1
    # With a slot no bigger than the pins nothing is random.
    assert explore(SCORES, 2, policy, rng, fixed=2).propensities.tolist() == [1.0, 1.0]


def test_softmax_is_numerically_safe_on_large_scores() -> None:
    weights = softmax_weights(np.array([1000.0, 999.0, float("nan")]), 0.01)
    assert np.isfinite(weights).all()
    assert weights[2] == 0.0
    probabilities = sequential_probabilities(np.array([1000.0, 999.0]), [1, 0], Exploration(mode="softmax"))
    assert probabilities[0] == pytest.approx(1 / (1 + math.e))
    assert probabilities[1] == pytest.approx(1.0)


def test_configuration_per_slot_name_then_kind_then_default_and_validation() -> None:
    settings = {
        "home": Exploration(mode="softmax", temperature=0.5),
        "product": Exploration(mode="epsilon_greedy", epsilon=0.1),
        "*": Exploration(mode="epsilon_greedy", epsilon=0.05),
    }
    assert exploration_for(settings, "home", "product").mode == "softmax"
    assert exploration_for(settings, "pdp", "product").epsilon == 0.1
    assert exploration_for(settings, "hero", "banner").epsilon == 0.05
    assert not exploration_for({}, "home", "product").active
    with pytest.raises(ValidationError):
        Exploration(mode="epsilon_greedy")  # ε-greedy without ε is a configuration mistake
    with pytest.raises(ValidationError):
        Exploration(mode="softmax", temperature=0.0)


def test_settings_read_exploration_from_the_environment_and_requests_cannot_set_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECOMMEND_EXPLORATION", '{"product": {"mode": "softmax", "temperature": 0.25, "top_n": 30}}')
    settings = RecommendSettings(environment="test")
    assert settings.exploration["product"] == Exploration(mode="softmax", temperature=0.25, top_n=30)
    with pytest.raises(ValidationError):
        RecommendRequest.model_validate(
            {"visitor_id": "v1", "slots": [{"name": "home", "exploration": {"mode": "off"}}]}
        )
    with pytest.raises(ValidationError):
        RecommendRequest.model_validate({"visitor_id": "v1", "slots": [{"name": "home"}], "exploration": "off"})


def test_the_service_explores_among_rule_eligible_items_only(world: SessionWorld) -> None:
    from tests.offline.test_policy_eval import copy_serving_state

    settings = copy_serving_state(world)
    repository = RecommendRepository.open(settings)
    try:
        wild = Exploration(mode="softmax", temperature=50.0)  # close to uniform over the eligible items
        explorer = RecommendService(
            settings.model_copy(update={"exploration": {"home": wild}, "log_impressions": False}),
            repository,
            clock=world.clock,
        )
        plain = RecommendService(settings.model_copy(update={"log_impressions": False}), repository, clock=world.clock)
        for service in (explorer, plain):
            service.refresh_cache()
            service.reload_model()
        catalog = {item.item_id: item for item in repository.catalog()}
        simulator = world.world.simulator
        explored = 0
        for visitor in simulator.visitors[:25]:
            row = repository.visitor_row(visitor.visitor_id) or {}
            bought = set(row.get("purchased_items") or [])
            request = RecommendRequest(
                visitor_id=visitor.visitor_id,
                context=RequestContext(device=visitor.device, city=visitor.city, now=world.world.end),
                slots=[SlotRequest(name="home", count=6, max_per_category=1), SlotRequest(name="more", count=3)],
            )
            response = explorer.recommend(request)
            home, more = response["slots"]
            categories = [catalog[item["item_id"]].category for item in home["items"]]
            assert len(categories) == len(set(categories))  # the slot's category cap holds
            assert not bought & {item["item_id"] for item in home["items"]}  # not just bought
            assert not {i["item_id"] for i in home["items"]} & {i["item_id"] for i in more["items"]}
            assert all(0 < item["propensity"] <= 1 for item in home["items"])
            explored += any(item["propensity"] < 1 for item in home["items"])
            # Other slots (not configured) and the service without exploration stay deterministic.
            assert all(item["propensity"] == 1.0 for item in more["items"])
            assert all(item["propensity"] == 1.0 for item in plain.recommend(request)["slots"][0]["items"])
        assert explored >= 20
    finally:
        repository.close()
        clean_namespace(REDIS_URL, settings.namespace)
