"""The pooled first stage: generators propose more than the served count and the best by fused score are kept
(services/recommend/ranking/candidates.py, RECOMMEND_CANDIDATE_POOL)."""

from __future__ import annotations

import numpy as np
import pytest

from services.recommend.ranking.candidates import CandidateGenerator, Filters
from tests.recommend.test_next_item import snapshot_and_visitor


def _ids(generator: CandidateGenerator) -> list[str]:
    snapshot, visitor = snapshot_and_visitor()
    candidates = generator.products(snapshot, visitor, ["all"], Filters())  # type: ignore[arg-type]
    return [snapshot.ids[i] for i in candidates.idx]  # type: ignore[attr-defined]


def test_without_a_pool_the_candidates_are_the_first_in_generator_priority_order() -> None:
    assert _ids(CandidateGenerator(10, pool=0)) == _ids(CandidateGenerator(10))
    assert _ids(CandidateGenerator(10, pool=10)) == _ids(CandidateGenerator(10))  # a pool of the served count
    assert _ids(CandidateGenerator(40))[:10] == _ids(CandidateGenerator(10))


def test_the_pool_keeps_the_served_count_and_prefers_items_several_generators_agree_on() -> None:
    quota = _ids(CandidateGenerator(10))
    pooled = _ids(CandidateGenerator(10, pool=40))
    assert len(pooled) == len(set(pooled)) == 10
    assert set(pooled) <= set(_ids(CandidateGenerator(40)))
    # The next-item and two-step candidates (the top of the order-aware lists) survive the cut.
    assert quota[:6] == pooled[:6] == ["i2", "i3", "i4", "i1", "i5", "i6"]
    # i162 and i41 both share a specific tag with the recent items (i162 a little more, so it comes first in
    # priority order), but i41 is also far more popular (rank ~35 against ~156): fused, i41 wins the last slot.
    assert "i162" in quota and "i41" not in quota
    assert "i41" in pooled and "i162" not in pooled


def test_the_ranker_columns_of_pooled_candidates_match_the_logged_impression_path() -> None:
    snapshot, visitor = snapshot_and_visitor()
    generator = CandidateGenerator(10, pool=40)
    candidates = generator.products(snapshot, visitor, ["all"], Filters())  # type: ignore[arg-type]
    logged = generator.signals(snapshot, visitor, candidates.idx)  # type: ignore[arg-type]
    for name, values in candidates.signals.items():
        if name != "x_generator":
            np.testing.assert_array_equal(values, logged[name], err_msg=name)


def test_a_negative_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="candidate pool"):
        CandidateGenerator(10, pool=-1)
