"""Item embeddings: they link items bought by the same kind of visitor (not only items bought one after the
other), survive the trip through storage, follow the snapshot's rows, feed the generator and the ranker
columns alike, and stay sparse for a 100,000-item catalog."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest

from services.features import schema as F
from services.features.item_cache import build_snapshot
from services.recommend.ranking.candidates import CandidateGenerator, Filters, VisitorVector
from services.recommend.ranking.item_embeddings import EmbeddingFileError, ItemEmbeddings
from services.recommend.ranking.ranker import explain_item
from services.recommend.training.embeddings import EmbeddingsOverTime, interaction_sequences
from tests.factories import BASE_TIME, make_event, make_item


def two_groups(users: int = 300, seed: int = 3) -> list[list[str]]:
    """Half the visitors buy 4 of the a-items, half 4 of the b-items, in random order."""
    rng = np.random.default_rng(seed)
    sequences = []
    for user in range(users):
        group = "a" if user % 2 else "b"
        sequences.append([f"{group}{n}" for n in rng.choice(12, 4, replace=False)])
    return sequences


def test_items_bought_by_the_same_visitors_score_highest() -> None:
    sequences = two_groups()
    embeddings = ItemEmbeddings.fit(sequences, dim=2)
    assert embeddings is not None
    items = [make_item(item_id=i) for i in [*(f"a{n}" for n in range(12)), *(f"b{n}" for n in range(12))]]
    snapshot = build_snapshot(items, {}, {}, {}, now=BASE_TIME.timestamp())
    # Every a-item, whether or not a visitor bought it next to a0.
    scores = embeddings.scores(snapshot, ["a0"], top=12)
    assert scores is not None
    best = {snapshot.ids[r] for r in scores.ranked()[:12]}
    assert best == {f"a{n}" for n in range(12)}
    # The same histories give the same vectors (svds starts from a fixed vector).
    again = ItemEmbeddings.fit(sequences, dim=2)
    assert again is not None
    np.testing.assert_allclose(np.abs(again.vectors), np.abs(embeddings.vectors), rtol=1e-4, atol=1e-5)


def test_too_little_data_learns_nothing() -> None:
    assert ItemEmbeddings.fit([["x"]]) is None
    assert ItemEmbeddings.fit([]) is None


def test_stored_embeddings_read_back_and_damaged_ones_are_refused() -> None:
    embeddings = ItemEmbeddings.fit(two_groups(), dim=2)
    assert embeddings is not None
    loaded = ItemEmbeddings.from_bytes(embeddings.to_bytes())
    assert loaded.ids == embeddings.ids
    np.testing.assert_array_equal(loaded.vectors, embeddings.vectors)
    with pytest.raises(EmbeddingFileError):
        ItemEmbeddings.from_bytes(embeddings.to_bytes()[:100])
    with pytest.raises(EmbeddingFileError):
        ItemEmbeddings.from_bytes(b"not numpy")


def test_vectors_follow_the_snapshot_rows_and_unknown_items_have_none() -> None:
    embeddings = ItemEmbeddings.fit(two_groups(), dim=2)
    assert embeddings is not None
    # A catalog in another order, with a new item and without b11.
    items = [make_item(item_id=i) for i in ["new", *(f"b{n}" for n in range(11)), *(f"a{n}" for n in range(12))]]
    snapshot = build_snapshot(items, {}, {}, {}, now=BASE_TIME.timestamp())
    aligned = embeddings.aligned(snapshot)
    assert aligned.shape == (snapshot.size, 2)
    assert not aligned[snapshot.index["new"]].any()
    np.testing.assert_array_equal(aligned[snapshot.index["a3"]], embeddings.vectors[embeddings.ids.index("a3")])
    assert embeddings.scores(snapshot, ["new"], top=5) is None  # nothing known about the visitor's item


def test_the_generator_proposes_embedding_neighbours_with_the_same_columns_as_logged_scoring() -> None:
    embeddings = ItemEmbeddings.fit(two_groups(), dim=2)
    assert embeddings is not None
    items = [make_item(item_id=i) for i in [*(f"a{n}" for n in range(12)), *(f"b{n}" for n in range(12))]]
    snapshot = build_snapshot(items, {}, {}, {}, now=BASE_TIME.timestamp())
    visitor = VisitorVector.from_row("v", {"event_count": 2, "recent_items": ["a1", "a2"]})
    generator = CandidateGenerator(10, sources=("embedding", "popular"))
    seen = Filters(exclude=frozenset({"a1", "a2"}))
    candidates = generator.products(snapshot, visitor, ["all"], seen, embeddings=embeddings)
    proposed = [snapshot.ids[i] for i, s in zip(candidates.idx, candidates.sources, strict=True) if s == "embedding"]
    assert set(proposed) == {f"a{n}" for n in range(12)} - {"a1", "a2"}
    assert (candidates.signals["x_embedding_rank"][: len(proposed)] < len(proposed)).all()
    logged = generator.signals(snapshot, visitor, candidates.idx, embeddings=embeddings)
    for name in ("x_embedding", "x_embedding_rank", "x_embedding_last"):
        np.testing.assert_array_equal(candidates.signals[name], logged[name], err_msg=name)
    # A model without embeddings: the generator is absent and its columns are missing, not zero.
    plain = generator.products(snapshot, visitor, ["all"], seen)
    assert "embedding" not in plain.sources
    assert np.isnan(plain.signals["x_embedding"]).all()


def test_a_catalog_of_100000_items_is_served_without_an_items_by_items_matrix() -> None:
    rng = np.random.default_rng(1)
    n_items = 100_000
    sequences = [[f"i{k}" for k in rng.integers(0, n_items, 4)] for _ in range(60_000)]
    embeddings = ItemEmbeddings.fit(sequences, dim=16)
    assert embeddings is not None
    assert embeddings.vectors.shape[1] == 16 and embeddings.vectors.dtype == np.float32
    items = [make_item(item_id=f"i{k}") for k in range(n_items)]
    snapshot = build_snapshot(items, {}, {}, {}, now=BASE_TIME.timestamp())
    scores = embeddings.scores(snapshot, sequences[0], top=320)
    assert scores is not None
    assert len(scores.top[0]) == 320
    assert embeddings.aligned(snapshot).nbytes == n_items * 16 * 4  # items x dim, never items x items


def test_an_item_ranked_up_by_its_embedding_score_is_explained_by_the_last_item() -> None:
    contributions = np.zeros(len(F.RANKER_FEATURES))
    contributions[F.RANKER_FEATURES.index("x_embedding")] = 0.8
    row = np.zeros(len(F.RANKER_FEATURES))
    row[F.RANKER_FEATURES.index("x_embedding")] = 0.3
    visitor = VisitorVector.from_row("v", {"event_count": 1, "recent_items": ["a1"]})
    reasons = explain_item(contributions, row, "Kite", None, None, visitor, 0, ["Ball"], "today", "embedding")
    assert reasons == ["chosen by people who chose Ball"]


def test_the_same_histories_give_the_same_vectors_in_another_process() -> None:
    # The hash seed of a process changes the iteration order of sets of strings; the fit must not depend on it.
    script = (
        "import sys, numpy as np\n"
        "from services.recommend.ranking.item_embeddings import ItemEmbeddings\n"
        "from tests.recommend.test_item_embeddings import two_groups\n"
        "e = ItemEmbeddings.fit(two_groups(), dim=4)\n"
        "sys.stdout.write(' '.join(e.ids) + '|' + ' '.join(f'{v:.6f}' for v in e.vectors.ravel()))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


def test_the_event_log_trainer_sees_only_embeddings_learned_before_each_query() -> None:
    """`selaras train` (event log): embeddings refitted at a few moments, each from the interactions before it."""
    start = BASE_TIME.timestamp()
    events = []
    for n, sequence in enumerate(two_groups(users=200)):
        for step, item in enumerate(sequence):
            # Visitors 0-99 act in the first hour, the others in the second; b-items only exist later.
            ts = start + (0 if n < 100 else 3600) + 10 * step
            item = item if n >= 100 or item.startswith("a") else "a" + item[1:]
            events.append(make_event(visitor_id=f"v{n}", item_id=item, timestamp=datetime.fromtimestamp(ts, UTC)))
    events.sort(key=lambda e: e.ts)
    products = {e.item_id for e in events if e.item_id}
    over_time = EmbeddingsOverTime(events, products, [start + 1800, start + 7200])
    assert over_time.at(start + 100) is None  # before the first refit: none, as without a trained model
    early, late = over_time.at(start + 1801), over_time.at(start + 7201)
    assert early is not None and late is not None
    assert all(i.startswith("a") for i in early.ids)  # nothing from after the refit moment
    assert any(i.startswith("b") for i in late.ids)
    assert over_time.at(start + 7200) is early  # a query exactly at a refit time does not see it
    assert interaction_sequences(events, products, before=start + 1800)[0] == [
        e.item_id for e in events if e.visitor_id == "v0"
    ]
