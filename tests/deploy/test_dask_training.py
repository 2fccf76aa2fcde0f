"""Distributed training with `lightgbm.dask` on a real local Dask cluster of two workers.

The training set is built once (log + Feast point-in-time features); the same rows are fitted on one machine
and on the cluster, and both models are evaluated on the same later queries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from distributed import Client, LocalCluster
from typer.testing import CliRunner

from services.cli import app
from services.features import schema as F
from services.recommend.repository import RecommendRepository
from services.recommend.training.distributed import DaskTrainer, group_partitions, present_categoricals, to_dask
from services.recommend.training.fit import TrainingSet
from services.recommend.training.train import Query, TrainConfig, Trainer
from tests.conftest import SessionWorld


def test_partitions_never_split_a_group() -> None:
    groups = [5, 1, 30, 2, 2, 7, 40, 3, 3, 9]
    runs = group_partitions(groups, 4)
    assert runs[0][0] == 0 and runs[-1][1] == len(groups)
    assert all(a[1] == b[0] for a, b in pairwise(runs))
    assert len(runs) <= 4 and all(end > first for first, end in runs)
    data = TrainingSet(np.arange(sum(groups) * 2.0).reshape(-1, 2), np.zeros(sum(groups)), groups, [0.0] * len(groups))
    X, y, group = to_dask(data, 4)
    assert X.chunks[0] == y.chunks[0] == tuple(sum(groups[a:b]) for a, b in runs)
    assert group.chunks[0] == tuple(b - a for a, b in runs)
    assert group_partitions([3], 8) == [(0, 1)] and group_partitions([], 2) == []


def test_a_categorical_feature_missing_everywhere_is_not_declared_categorical() -> None:
    X = np.ones((4, len(F.RANKER_FEATURES)))
    X[:, F.RANKER_FEATURES.index("v_persona_id")] = np.nan
    X[:2, F.RANKER_FEATURES.index("v_lifecycle_code")] = np.nan  # missing in part of the rows: still categorical
    names = present_categoricals(TrainingSet(X, np.zeros(4), [4], [0.0]))
    assert "v_persona_id" not in names
    assert set(names) == set(F.CATEGORICAL_FEATURES) - {"v_persona_id"}


def test_cli_refuses_dask_without_a_scheduler(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data-dir", str(tmp_path), "--engine", "dask"], env={"REDIS_URL": ""})
    assert result.exit_code == 2 and "--scheduler" in result.output
    result = runner.invoke(app, ["train", "--data-dir", str(tmp_path), "--engine", "spark"], env={"REDIS_URL": ""})
    assert result.exit_code == 2


class SideBySide(DaskTrainer):
    """Fits the same training set on one machine and on the cluster; `train()` reports the cluster model."""

    local_booster: lgb.Booster
    local_metrics: dict[str, Any]
    sets: tuple[TrainingSet, TrainingSet]

    def fit(self, train_set: TrainingSet, valid_set: TrainingSet) -> lgb.Booster:
        self.sets = (train_set, valid_set)
        self.local_booster = Trainer.fit(self, train_set, valid_set)
        return super().fit(train_set, valid_set)

    def evaluate(
        self, booster: lgb.Booster, valid_set: TrainingSet, details: Sequence[Any], queries: Sequence[Query]
    ) -> dict[str, Any]:
        self.local_metrics = Trainer.evaluate(self, self.local_booster, valid_set, details, queries)
        return super().evaluate(booster, valid_set, details, queries)


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Client]:
    # Worker processes, not threads: each LightGBM machine keeps process-global network state.
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.mark.slow
def test_dask_training_matches_single_machine_ndcg(world: SessionWorld, dask_client: Client) -> None:
    repository = RecommendRepository.open(world.settings)
    # 3,000 queries: 600 later ones to evaluate on, enough that two equally good models land within 0.01.
    config = TrainConfig(seed=11, max_queries=3000, snapshot_step_s=6 * 3600, threads=1)
    trainer = SideBySide(repository, config, dask_client)
    try:
        result = trainer.train()
    finally:
        repository.close()
    train_set, _ = trainer.sets
    assert len(train_set.groups) > 300
    assert len(dask_client.scheduler_info()["workers"]) == 2
    dask_ndcg, local_ndcg = result.metrics["ndcg@10"], trainer.local_metrics["ndcg@10"]
    print(f"\nNDCG@10 dask {dask_ndcg:.4f} vs single machine {local_ndcg:.4f} on {result.metrics['evaluated_queries']}")
    assert abs(dask_ndcg - local_ndcg) <= 0.01, (result.metrics, trainer.local_metrics)
    # Both learned something: better than popularity on the same queries.
    assert dask_ndcg > result.metrics["popularity_ndcg@10"] + 0.02
    # The cluster's model is an ordinary booster: it reloads from text like every served model.
    reloaded = lgb.Booster(model_str=result.model_text.decode())
    assert reloaded.feature_name() == list(trainer.local_booster.feature_name())
