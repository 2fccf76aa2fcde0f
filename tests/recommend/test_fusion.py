"""Learned score fusion (services/recommend/ranking/fusion.py): the cut from a larger candidate pool to the
served count. Its weights survive storage (and damaged or foreign ones are refused), the cut keeps what the
weights prefer, training learns a cut that finds the next item more often than priority order, and training
and serving cut the same pool to the same candidates for the same visitor."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest

from services.features.aggregations import SegmentRules
from services.features.item_cache import ItemSnapshot, catalog_arrays
from services.profile.sequences import Histories, catalog_items, read_histories
from services.recommend.ranking.candidates import SOURCES, CandidateGenerator, Filters
from services.recommend.ranking.fusion import CandidateFusion, FusionFileError, feature_names
from services.recommend.ranking.pipeline import RankContext
from services.recommend.ranking.rules import RuleContext
from services.recommend.repository import RecommendRepository
from services.recommend.schemas import SlotFilters, SlotRequest
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from services.recommend.training.histories import catalog_info, fold_world, seen_filter, train_on_histories
from services.recommend.training.train import TrainConfig
from tests.recommend.test_history_eval import write_histories
from tests.recommend.test_next_item import snapshot_and_visitor

SERVED = 10
POOL = 40


def _weights(**named: float) -> CandidateFusion:
    names = feature_names(SOURCES)
    weights = np.array([named.get(n, 0.0) for n in names])
    return CandidateFusion(POOL, names, np.zeros(len(names)), np.ones(len(names)), weights)


def test_weights_read_back_and_damaged_or_foreign_ones_are_refused() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, len(feature_names(SOURCES))))
    y = X[:, 0] + 0.3 * rng.normal(size=400) > 1.0
    fusion = CandidateFusion.fit(X, y, POOL, SOURCES)
    loaded = CandidateFusion.from_bytes(fusion.to_bytes(), SOURCES)
    np.testing.assert_array_equal(loaded.score(X), fusion.score(X))
    assert loaded.pool == POOL
    assert fusion.weights[0] == max(fusion.weights)  # the one informative column weighs most
    with pytest.raises(FusionFileError, match="unreadable"):
        CandidateFusion.from_bytes(fusion.to_bytes()[:50], SOURCES)
    with pytest.raises(FusionFileError, match="other features"):
        CandidateFusion.from_bytes(fusion.to_bytes(), SOURCES[:-1])
    with pytest.raises(ValueError, match="in the pool and others"):
        CandidateFusion.fit(X, np.zeros(400, dtype=bool), POOL, SOURCES)


def test_the_cut_keeps_the_served_count_from_the_pool_and_follows_the_weights() -> None:
    snapshot, visitor = snapshot_and_visitor()
    generator = CandidateGenerator(SERVED)
    pool, _ = generator.pooled(snapshot, visitor, ["all"], Filters(), POOL)  # type: ignore[arg-type]
    assert len(pool) > SERVED
    by_popularity = generator.products(
        snapshot,  # type: ignore[arg-type]
        visitor,
        ["all"],
        Filters(),
        fusion=_weights(log_popularity=1.0),
    )
    by_tags = generator.products(
        snapshot,  # type: ignore[arg-type]
        visitor,
        ["all"],
        Filters(),
        fusion=_weights(x_shared_tags=1.0, log_popularity=1e-3),
    )
    for cut in (by_popularity, by_tags):
        assert len(cut.idx) == len(set(cut.idx.tolist())) == SERVED
        assert set(cut.idx.tolist()) <= set(pool.tolist())
    popularity = cast(ItemSnapshot, snapshot).popularity_score
    in_pool = np.sort(popularity[pool])[::-1]
    np.testing.assert_array_equal(np.sort(popularity[by_popularity.idx])[::-1], in_pool[:SERVED])
    assert set(by_tags.sources) == {"shared_tags"} or by_tags.signals["x_shared_tags"].min() > 0
    # The ranker's columns are those of the kept rows, as without a cut.
    logged = generator.signals(snapshot, visitor, by_tags.idx)  # type: ignore[arg-type]
    np.testing.assert_array_equal(by_tags.signals["x_shared_tags"], logged["x_shared_tags"])


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Histories:
    folder = tmp_path_factory.mktemp("walk")
    path = write_histories(folder, users=400, seed=5)
    return read_histories(path, folder / "Walk_item2attributes.json")


def _recall(histories: Histories, generator: CandidateGenerator, fusion: CandidateFusion | None) -> float:
    """Share of held-out last items among the candidates (world folded without them, as evaluation does)."""
    items = catalog_items(histories)
    world = fold_world(histories.truncated(1), catalog_arrays(items), catalog_info(items), SegmentRules())
    _, keys = world.context()
    found = 0
    for user, sequence in zip(histories.users, histories.sequences, strict=True):
        visitor = world.visitor(user)
        idx = generator.products(world.snapshot, visitor, keys, seen_filter(sequence[:-1]), fusion=fusion).idx
        found += int(world.snapshot.index[sequence[-1]] in idx)
    return found / len(histories.users)


def test_training_learns_a_cut_that_finds_the_next_item_more_often_than_priority_order(walk: Histories) -> None:
    # Without the next-item generator, the lists in priority order (tags, category, brand, popular) hold the
    # next item far less often than a cut that learns which of their items tend to come next.
    sources = ("shared_tags", "category", "brand", "popular", "trending")
    config = TrainConfig(max_queries=10**6, fusion_pool=POOL, validation_fraction=0.2)
    model, _, metrics = train_on_histories(walk.truncated(1), SERVED, config, sources)
    assert model.fusion is not None and metrics["fusion_pool"] == POOL
    generator = CandidateGenerator(SERVED, sources=sources)
    quotas, fused = _recall(walk, generator, None), _recall(walk, generator, model.fusion)
    assert fused > quotas + 0.05, (quotas, fused)


def test_training_and_serving_cut_the_pool_to_the_same_candidates(walk: Histories, tmp_path: Path) -> None:
    config = TrainConfig(max_queries=10**6, fusion_pool=POOL)
    trained, text, _ = train_on_histories(walk, SERVED, config)
    assert trained.fusion is not None and trained.embeddings is not None
    settings = RecommendSettings(data_dir=tmp_path, redis_url=None, max_candidates=SERVED)
    repository = RecommendRepository.open(settings)
    try:
        repository.save_model(text, trained.meta, trained.embeddings.to_bytes(), trained.fusion.to_bytes())
        service = RecommendService(settings.model_copy(update={"exploration": {}}), repository)
        index = repository.model_index()
        served = service.models._load(trained.meta.version, index)
    finally:
        repository.close()
    assert served is not None and served.fusion is not None
    items = catalog_items(walk)
    world = fold_world(walk, catalog_arrays(items), catalog_info(items), SegmentRules())
    context, keys = world.context()
    rules = RuleContext(context["hour"], None, None, bool(context["is_payday_window"]))
    training_generator = CandidateGenerator(SERVED)
    compared = 0
    for user, sequence in list(zip(walk.users, walk.sequences, strict=True))[:60]:
        visitor = world.visitor(user)
        filters = seen_filter(sequence)
        # Training: the generator with the in-memory model's embeddings and cut.
        trained_idx = training_generator.products(
            world.snapshot, visitor, keys, filters, embeddings=trained.embeddings, fusion=trained.fusion
        ).idx
        # Serving: the slot pipeline with the model as the registry gave it back.
        slot = SlotRequest(name="parity", count=SERVED, filters=SlotFilters(exclude_items=sorted(filters.exclude)))
        ranked = service.rank_slot(
            slot, RankContext(world.snapshot, served, visitor, dict(context), keys, rules, world.at, False), set()
        )
        np.testing.assert_array_equal(np.sort(ranked.candidates), np.sort(trained_idx), err_msg=user)
        compared += int(len(trained_idx) == SERVED)
    assert compared > 50  # the cut did run (the pool was larger than the served count)
    # A list the shop gives (re-ranking) or anchors' neighbours: the ranker reads the model's embedding columns
    # there too, as it learned them, not NaN.
    visitor = world.visitor(walk.users[0])
    given = np.arange(min(20, world.snapshot.size), dtype=np.int64)
    rank = RankContext(world.snapshot, served, visitor, dict(context), keys, rules, world.at, False)
    signals = service.pipeline._given_set(rank, given, visitor, "given").signals
    assert not np.isnan(signals["x_embedding"]).all()
