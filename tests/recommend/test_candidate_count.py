"""How many candidates a request serves grows with the catalogue (services/recommend/ranking/candidates.py
CandidateCount), and the generators' budgets grow with it so they do fill the larger count."""

from __future__ import annotations

import pytest

from services.common.catalog import ItemKind
from services.features.item_cache import build_snapshot
from services.recommend.ranking.candidates import (
    PER_SOURCE,
    CandidateCount,
    CandidateGenerator,
    Filters,
    VisitorVector,
    budget_for,
)
from services.recommend.settings import RecommendSettings
from tests.factories import BASE_TIME, make_item


@pytest.mark.parametrize(
    ("products", "served"),
    [(0, 500), (2_000, 500), (6_000, 500), (11_924, 1_000), (18_357, 1_500), (100_000, 1_500)],
)
def test_the_default_count_is_500_on_small_catalogues_and_a_share_of_large_ones_up_to_the_limit(
    products: int, served: int
) -> None:
    assert RecommendSettings(redis_url=None).candidate_count().for_products(products) == served


def test_a_share_of_zero_or_a_fixed_int_serves_the_same_count_whatever_the_catalogue() -> None:
    assert CandidateCount(300, 0.0, 300).for_products(1_000_000) == 300
    assert CandidateGenerator(40).count == CandidateCount(40, 0.0, 40)
    # A limit below the minimum: the minimum wins (settings raise the limit to the minimum too).
    assert CandidateCount(800, 0.5, 100).for_products(10_000) == 800
    assert RecommendSettings(redis_url=None, max_candidates=900, candidate_limit=100).candidate_count().limit == 900


def test_budgets_grow_in_proportion_above_500_candidates_and_never_shrink_below() -> None:
    assert budget_for(10) == budget_for(500) == PER_SOURCE
    assert budget_for(1_000) == 2 * PER_SOURCE
    assert budget_for(1_500) == 3 * PER_SOURCE


def test_a_larger_catalogue_is_served_more_candidates_by_the_same_generator() -> None:
    def products(n: int) -> list:
        items = [make_item(item_id=f"p{k}", category=f"c{k % 3}") for k in range(n)]
        # Banners and CTAs are not products: they do not count towards the catalogue's size.
        return items + [make_item(item_id=f"b{k}", kind=ItemKind.BANNER) for k in range(300)]

    generator = CandidateGenerator(CandidateCount(minimum=20, share=0.1, limit=200))
    visitor = VisitorVector.from_row("v", None)
    now = BASE_TIME.timestamp()
    small = build_snapshot(products(300), {}, {}, {}, now=now)
    large = build_snapshot(products(3_000), {}, {}, {}, now=now)
    assert generator.budget(small).served == 20  # 10% of 300 is 30, in whole hundreds: 0, so the minimum
    assert generator.budget(large).served == 200  # 10% of 3,000 is 300: capped at the limit
    assert generator.budget(large).per_source == PER_SOURCE  # 200 candidates: the base budget
    many = generator.products(large, visitor, ["all"], Filters(), personalized=False)
    few = generator.products(small, visitor, ["all"], Filters(), personalized=False)
    assert len(few.idx) == 20
    assert 20 < len(many.idx) <= 200


def test_training_keeps_a_tenth_of_a_querys_candidates_as_negatives_at_least_50_unless_told() -> None:
    from services.recommend.training.train import TrainConfig

    assert TrainConfig().negatives_for(300) == 50
    assert TrainConfig().negatives_for(500) == 50
    assert TrainConfig().negatives_for(1_500) == 150
    assert TrainConfig(max_negatives=20).negatives_for(1_500) == 20
