"""Serving item embeddings per request: the vectorised scores and columns equal a straightforward item-by-item
computation on a small random model (the candidates, their order and the three ranker columns), the fast sort
orders exactly like the stable one, and the work is shared where the inputs are the same (the slots of one
request, the snapshots of one catalog)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.features.item_cache import ItemSnapshot, build_snapshot, catalog_arrays
from services.recommend.ranking.candidates import CandidateGenerator, Filters, VisitorVector
from services.recommend.ranking.item_embeddings import (
    EMBEDDING_DECAY,
    EMBEDDING_HISTORY,
    ItemEmbeddings,
    descending,
)
from tests.factories import BASE_TIME, make_item

DIM = 8


def random_world(seed: int) -> tuple[ItemEmbeddings, ItemSnapshot, list[str]]:
    """60 embedded items; a catalog in another order holding 50 of them and 10 items without a vector."""
    rng = np.random.default_rng(seed)
    embedded = [f"e{n}" for n in range(60)]
    embeddings = ItemEmbeddings(tuple(embedded), rng.standard_normal((60, DIM)).astype(np.float32))
    catalog = [*embedded[:50], *(f"plain{n}" for n in range(10))]
    rng.shuffle(catalog)
    snapshot = build_snapshot([make_item(item_id=i) for i in catalog], {}, {}, {}, now=BASE_TIME.timestamp())
    # What visitors saw: catalog items with and without vectors, embedded items gone from the catalog, strangers.
    seen = [*catalog, *embedded[50:], "stranger"]
    return embeddings, snapshot, seen


def reference(
    embeddings: ItemEmbeddings, snapshot: ItemSnapshot, recent: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Item by item: the query summed in float32 over the latest items in the catalog (an item without a vector
    counts as zeros); then every catalog row scored on its own in float64, against the query and the last item."""
    vector_of = dict(zip(embeddings.ids, embeddings.vectors, strict=True))
    zeros = np.zeros(DIM, dtype=np.float32)
    query = zeros.copy()
    last = zeros
    used = False
    for rank, item_id in enumerate(recent[:EMBEDDING_HISTORY]):
        if item_id not in snapshot.index:
            continue
        vector = vector_of.get(item_id, zeros)
        query += vector * np.float32(EMBEDDING_DECAY**rank)
        if rank == 0:
            last = vector
        used = True
    if not used or not query.any():
        return None

    def score(item_id: str, against: np.ndarray) -> float:
        return float(np.dot(vector_of.get(item_id, zeros).astype(np.float64), against.astype(np.float64)))

    values = np.array([score(item_id, query) for item_id in snapshot.ids])
    last_values = np.array([score(item_id, last) for item_id in snapshot.ids])
    return query, values, last_values


# float32 arithmetic against the float64 reference (scores are at most ~20 here)
TOL = 1e-4


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 3),
    picks=st.lists(st.integers(0, 60), max_size=2 * EMBEDDING_HISTORY),
    top=st.integers(0, 70),
    rows=st.lists(st.integers(0, 59), max_size=60, unique=True),
)
def test_scores_and_columns_equal_the_item_by_item_computation(
    seed: int, picks: list[int], top: int, rows: list[int]
) -> None:
    embeddings, snapshot, seen = random_world(seed)
    recent = [seen[p] for p in picks]  # repeats, unknown items and more than EMBEDDING_HISTORY items included
    scores = embeddings.scores(snapshot, recent, top)
    expected = reference(embeddings, snapshot, recent)
    if expected is None:
        assert scores is None
        return
    assert scores is not None
    query, values, last_values = expected
    np.testing.assert_array_equal(scores.query, query)
    # The best `top` rows, best first. Items without a vector all score 0: which of them make the cut is open,
    # and so is the order of scores within float32 rounding of each other.
    ranked = scores.ranked()
    assert len(ranked) == min(top, snapshot.size) == len(set(ranked.tolist()))
    np.testing.assert_array_equal(scores.top[0], np.sort(ranked))
    np.testing.assert_allclose(scores.top[1], values[scores.top[0]], rtol=1e-5, atol=1e-6)
    assert (np.diff(values[ranked]) <= TOL).all()
    left_out = np.setdiff1d(np.arange(snapshot.size), ranked)
    if len(ranked) and len(left_out):
        assert values[left_out].max() <= values[ranked].min() + TOL

    idx = np.array(rows, dtype=np.int64)
    columns = scores.columns(idx)
    for name, expected_values in (("x_embedding", values[idx]), ("x_embedding_last", last_values[idx])):
        assert columns[name].dtype == np.float64
        np.testing.assert_allclose(columns[name], expected_values, rtol=1e-5, atol=1e-6, err_msg=name)
    # The rank: 0 for the best candidate, ties in candidate order (exactly the stable order of its own scores).
    order = np.argsort(columns["x_embedding_rank"])
    np.testing.assert_array_equal(columns["x_embedding_rank"][order], np.arange(len(idx)))
    np.testing.assert_array_equal(order, np.argsort(-columns["x_embedding"], kind="stable"))
    assert (np.diff(values[idx][order]) <= TOL).all()


def test_the_query_is_the_float32_sum_of_the_item_by_item_loop_bit_for_bit() -> None:
    # The query feeds every score: summed in another order it would move scores by float32 rounding, and with
    # them near-tied candidates and the ranker's columns.
    rng = np.random.default_rng(5)
    embeddings, snapshot, seen = random_world(5)
    for _ in range(300):
        recent = [seen[int(p)] for p in rng.integers(0, len(seen), int(rng.integers(1, 30)))]
        expected = reference(embeddings, snapshot, recent)
        scores = embeddings.scores(snapshot, recent, 10)
        assert (scores is None) == (expected is None)
        if scores is not None and expected is not None:
            assert scores.query.dtype == np.float32
            np.testing.assert_array_equal(scores.query, expected[0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([-1.5, -0.0, 0.0, 0.25, 1.0, 3.0, float("nan")]) | st.floats(-5, 5), max_size=40))
def test_the_fast_descending_order_is_the_stable_one_ties_and_nan_included(values: list[float]) -> None:
    for dtype in (np.float64, np.float32):
        array = np.array(values, dtype=dtype)
        np.testing.assert_array_equal(descending(array), np.argsort(-array, kind="stable"))


def test_the_product_slots_of_one_request_share_the_visitors_scores() -> None:
    embeddings, snapshot, seen = random_world(1)
    recent = seen[:5]
    first = embeddings.scores(snapshot, recent, 20)
    assert first is not None
    assert embeddings.scores(snapshot, list(recent), 20) is first  # the same visitor again: computed once
    assert embeddings.scores(snapshot, recent, 21) is not first
    other = embeddings.scores(snapshot, seen[1:6], 20)
    assert other is not None and not np.array_equal(other.query, first.query)
    # Through the generator, as two personal slots of one request: the same candidates and columns.
    visitor = VisitorVector.from_row("v", {"event_count": 5, "recent_items": recent})
    generator = CandidateGenerator(30, sources=("embedding", "popular"))
    slots = [generator.products(snapshot, visitor, ["all"], Filters(), embeddings=embeddings) for _ in range(2)]
    np.testing.assert_array_equal(slots[0].idx, slots[1].idx)
    for name in ("x_embedding", "x_embedding_rank", "x_embedding_last"):
        np.testing.assert_array_equal(slots[0].signals[name], slots[1].signals[name])


def test_a_refreshed_snapshot_keeps_the_aligned_vectors_and_a_new_catalog_gets_its_own() -> None:
    embeddings, _, _ = random_world(2)
    # The refresher rebuilds the snapshot from the same catalog arrays every few seconds.
    catalog = catalog_arrays([make_item(item_id=f"e{n}") for n in range(50)])
    snapshot = build_snapshot(catalog, {}, {}, {}, now=BASE_TIME.timestamp())
    aligned = embeddings.aligned(snapshot)
    refreshed = build_snapshot(catalog, {}, {}, {}, now=BASE_TIME.timestamp() + 10)
    assert embeddings.aligned(refreshed) is aligned
    # Another catalog of the same size (one item replaced): aligned again, to its own rows.
    ids = [f"e{n}" for n in range(50)]
    ids[0] = "e55"
    changed = build_snapshot([make_item(item_id=i) for i in ids], {}, {}, {}, now=BASE_TIME.timestamp())
    realigned = embeddings.aligned(changed)
    assert realigned is not aligned
    np.testing.assert_array_equal(realigned[0], embeddings.vectors[embeddings.ids.index("e55")])
    # The visitor's scores of one catalog are not served for the other.
    before, after = embeddings.scores(refreshed, ["e1", "e2"], 5), embeddings.scores(changed, ["e1", "e2"], 5)
    assert before is not None and after is not None
    np.testing.assert_array_equal(before.vectors, aligned)
    np.testing.assert_array_equal(after.vectors, realigned)
    assert not np.array_equal(before.vectors[0], after.vectors[0])
