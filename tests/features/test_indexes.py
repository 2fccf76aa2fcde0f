"""Candidate-index rules (services/features/indexes.py) as units: the order a co-visitation row is kept in."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from services.features.indexes import COVISIT_MAX_NEIGHBOURS, CoVisitation

# Few distinct ids and weights, so ties (the interesting case for the order) are common.
ROWS = st.dictionaries(
    st.sampled_from([f"item-{n}" for n in range(60)]),
    st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.75]),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(row=ROWS, k=st.integers(min_value=0, max_value=70))
def test_top_is_heaviest_first_with_ties_by_id(row: dict[str, float], k: int) -> None:
    index = CoVisitation()
    index.neighbours["anchor"] = dict(row)
    assert index.top("anchor", k) == sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def test_a_stored_row_keeps_only_the_heaviest_neighbours_and_merges_add_up() -> None:
    index = CoVisitation()
    index.neighbours["anchor"] = {f"item-{n}": float(n % 7) for n in range(COVISIT_MAX_NEIGHBOURS + 40)}
    assert CoVisitation().top("missing", 5) == []
    stored = dict(orjson.loads(index.dump("anchor")))
    assert len(stored) == COVISIT_MAX_NEIGHBOURS and "item-0" not in stored  # weight 0: among the lightest
    merged = dict(orjson.loads(CoVisitation.merge(index.dump("anchor"), {"item-0": 10.0, "new": 0.5})))
    assert len(merged) == COVISIT_MAX_NEIGHBOURS
    assert merged["item-0"] == 10.0  # dropped before, now the heaviest
    assert "new" not in merged  # lighter than every kept neighbour
