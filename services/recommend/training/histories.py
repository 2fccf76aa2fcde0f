"""Training the served ranker on interaction histories folded in-process (services/profile/aggregator/bulk_fold.py).

Each visitor's last interaction is a query; its candidates come from the serving generators over the indexes,
visitor rows and item statistics folded from everything before the visitor's last interactions (so no query
sees its own answer). The model is the one the service loads: same feature matrix, same candidate count.
Serving then folds everything, including those last interactions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from services.common.catalog import CatalogItem
from services.common.context import context_features
from services.features import schema as F
from services.features.aggregations import ItemInfo, SegmentRules
from services.features.indexes import COVISIT_MAX_NEIGHBOURS
from services.features.item_cache import CatalogArrays, ItemSnapshot, build_snapshot, catalog_arrays
from services.profile.aggregator.bulk_fold import FoldedHistory, fold_history
from services.profile.sequences import SYNTHETIC_STEP_S, Histories, catalog_items, purchase_events
from services.recommend.ranking.candidates import (
    SOURCES,
    CandidateCount,
    CandidateGenerator,
    Filters,
    VisitorVector,
    context_keys_for,
)
from services.recommend.ranking.fusion import FUSION_NEGATIVES, FUSION_QUERIES, CandidateFusion
from services.recommend.ranking.item_embeddings import ItemEmbeddings
from services.recommend.ranking.ranker import ModelMeta, RankerModel, feature_matrix
from services.recommend.training.fit import TrainingSet, fit_ranker, ranker_params
from services.recommend.training.train import TrainConfig

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]
MAX_EXCLUDED = 500  # a slot's exclude list is capped at 500 ids (schemas.py): the most recent ones


@dataclass
class FoldedWorld:
    """Everything a query needs, as of one moment: the snapshot, visitor rows and each visitor's history."""

    histories: Histories
    folded: FoldedHistory
    snapshot: ItemSnapshot
    at: float
    rules: SegmentRules

    def visitor(self, user: str) -> VisitorVector:
        return VisitorVector.from_row(user, self.folded.visitor_row(user, self.rules, self.at))

    def context(self) -> tuple[dict[str, int], list[str]]:
        return context_features(self.at, None, None, None, None), context_keys_for(None, None, self.at, None)


def catalog_info(items: Sequence[CatalogItem]) -> dict[str, ItemInfo]:
    return {item.item_id: ItemInfo(item.category, item.brand, item.price, item.discount) for item in items}


def fold_world(
    histories: Histories, arrays: CatalogArrays, info: dict[str, ItemInfo], rules: SegmentRules
) -> FoldedWorld:
    """Fold every interaction of `histories` and build the serving snapshot just after the last one."""
    folded = fold_history(purchase_events(histories), info)
    at = folded.last_ts + SYNTHETIC_STEP_S
    # The lists the aggregator stores (CoVisitation.dump) and the refresher reads: the top neighbours.
    neighbours = {
        item: folded.covisitation.top(item, COVISIT_MAX_NEIGHBOURS) for item in folded.covisitation.neighbours
    }
    snapshot = build_snapshot(arrays, folded.item_rows(at), neighbours, folded.popularity.scores, now=at)
    return FoldedWorld(histories, folded, snapshot, at, rules)


def seen_filter(sequence: Sequence[str]) -> Filters:
    """Items the visitor already interacted with are not recommended again (the shop's exclude list)."""
    return Filters(exclude=frozenset(sequence[-MAX_EXCLUDED:]))


def train_on_histories(
    histories: Histories,
    count: int | CandidateCount,
    config: TrainConfig,
    sources: Sequence[str] = SOURCES,
    rules: SegmentRules | None = None,
    progress: Progress | None = None,
    pool: int = 0,
) -> tuple[RankerModel, bytes, dict[str, float]]:
    """A LightGBM ranker for the served pipeline: one query per visitor (the last interaction).
    `config.fusion_pool` larger than the served count: a learned cut of a pool that large (CandidateFusion) is
    fitted on the same queries first, the ranker trains on the candidates it keeps, and the model carries it."""
    started = time.perf_counter()
    report = progress or (lambda _stage, _fraction: None)
    rules = rules or SegmentRules()
    items = catalog_items(histories)
    arrays = catalog_arrays(items)
    users = [i for i, s in enumerate(histories.sequences) if len(s) >= 2]
    rng = np.random.default_rng(config.seed)
    if len(users) > config.max_queries:
        users = sorted(rng.choice(users, config.max_queries, replace=False).tolist())
    report("folding the histories", 0.0)
    world = fold_world(histories.truncated(1), arrays, catalog_info(items), rules)
    report("learning item embeddings", 0.0)
    # Queries see embeddings learned without their answers; the served model gets them learned on everything.
    embeddings = ItemEmbeddings.fit(world.histories.sequences) if "embedding" in sources else None
    generator = CandidateGenerator(count, sources=sources, pool=pool)
    context, keys = world.context()
    fusion = None
    if config.fusion_pool > generator.budget(world.snapshot).served:
        report("learning the candidate fusion", 0.0)
        fusion = fit_fusion(histories, world, users, generator, keys, embeddings, config.fusion_pool, config.seed)
    valid_every = max(round(1 / config.validation_fraction), 2) if config.validation_fraction > 0 else 0
    sets = {"train": _Groups(), "valid": _Groups()}
    for n, u in enumerate(users):
        user, sequence = histories.users[u], histories.sequences[u]
        target = world.snapshot.index.get(sequence[-1])
        visitor = world.visitor(user)
        candidates = generator.products(
            world.snapshot, visitor, keys, seen_filter(sequence[:-1]), embeddings=embeddings, fusion=fusion
        )
        if target is None or not len(candidates.idx):
            continue
        grades = (candidates.idx == target).astype(np.float64)
        if grades.max() <= 0:
            continue
        idx, signals = candidates.idx, candidates.signals
        negatives = np.flatnonzero(grades == 0)
        kept = config.negatives_for(len(idx))
        if len(negatives) > kept:
            keep = np.sort(np.concatenate([np.flatnonzero(grades > 0), rng.choice(negatives, kept, replace=False)]))
            idx, grades = idx[keep], grades[keep]
            signals = {name: values[keep] for name, values in signals.items()}
        X = feature_matrix(
            visitor, context, world.snapshot.columns(idx, "", world.at), signals, np.full(len(idx), 0.5), world.at
        )
        sets["valid" if valid_every and n % valid_every == 0 else "train"].add(X, grades)
        if n % 1000 == 0:
            report("building training groups", n / max(len(users), 1))
    report("training LightGBM", 0.0)
    train_set, valid_set = sets["train"].stack(), sets["valid"].stack()
    if not train_set.groups:
        raise ValueError("no training query had its next item among the candidates")
    booster = fit_ranker(config, train_set, valid_set)
    metrics = {
        "fusion_pool": float(fusion.pool if fusion is not None else 0),
        "train_queries": float(len(train_set.groups)),
        "validation_queries": float(len(valid_set.groups)),
        "best_iteration": float(booster.best_iteration),
        "seconds": round(time.perf_counter() - started, 1),
    }
    meta = ModelMeta(
        version=f"histories-{datetime.fromtimestamp(world.at, tz=UTC).strftime('%Y%m%dT%H%M%S')}",
        created_at=world.at,
        features=F.RANKER_FEATURES,
        feature_service=F.FEATURE_SERVICE,
        metrics=metrics,
        params=ranker_params(config),
    )
    text = booster.model_to_string().encode()
    # Loaded the way the service loads a saved model (compatibility check, one long-lived predictor).
    model = RankerModel.from_bytes(text, meta)
    model.fusion = fusion
    if embeddings is not None:
        model.embeddings = ItemEmbeddings.fit(histories.sequences)
    return model, text, metrics


def fit_fusion(
    histories: Histories,
    world: FoldedWorld,
    users: Sequence[int],
    generator: CandidateGenerator,
    keys: Sequence[str],
    embeddings: ItemEmbeddings | None,
    pool: int,
    seed: int,
) -> CandidateFusion | None:
    """The pool's cut, fitted on (a sample of) the ranker's own queries: each visitor's last interaction is
    the positive among the pool's candidates. None when no query's next item is in the pool."""
    rng = np.random.default_rng(seed + 1)
    chosen = sorted(rng.choice(len(users), min(len(users), FUSION_QUERIES), replace=False).tolist())
    rows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for n in chosen:
        sequence = histories.sequences[users[n]]
        target = world.snapshot.index.get(sequence[-1])
        visitor = world.visitor(histories.users[users[n]])
        idx, X = generator.pooled(world.snapshot, visitor, keys, seen_filter(sequence[:-1]), pool, embeddings)
        y = idx == target
        if target is None or not y.any():
            continue
        negatives = np.flatnonzero(~y)
        sampled = rng.choice(negatives, min(len(negatives), FUSION_NEGATIVES), replace=False)
        keep = np.concatenate([np.flatnonzero(y), sampled])
        rows.append(X[keep])
        labels.append(y[keep])
    if not rows:
        return None
    return CandidateFusion.fit(np.vstack(rows), np.concatenate(labels), pool, SOURCES, seed)


class _Groups:
    def __init__(self) -> None:
        self.X: list[np.ndarray] = []
        self.y: list[np.ndarray] = []

    def add(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X.append(X)
        self.y.append(y)

    def stack(self) -> TrainingSet:
        if not self.X:
            return TrainingSet(np.zeros((0, len(F.RANKER_FEATURES))), np.zeros(0), [], [])
        return TrainingSet(np.vstack(self.X), np.concatenate(self.y), [len(y) for y in self.y], [])
