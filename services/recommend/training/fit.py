"""Fitting the LightGBM lambdarank ranker on training groups: the one place its parameters are set, for the
event-log Trainer, the Dask trainer and training on interaction histories alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np

from services.features import schema as F

if TYPE_CHECKING:
    from services.recommend.training.train import TrainConfig


@dataclass
class TrainingSet:
    X: np.ndarray
    y: np.ndarray
    groups: list[int]
    query_ts: list[float]

    def extended(self, other: TrainingSet) -> TrainingSet:
        return TrainingSet(
            np.vstack([self.X, other.X]),
            np.concatenate([self.y, other.y]),
            self.groups + other.groups,
            self.query_ts + other.query_ts,
        )


def ranker_params(config: TrainConfig) -> dict[str, Any]:
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "ndcg_eval_at": [10],
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": config.min_data_in_leaf,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.9,
        "bagging_freq": 1,
        "lambdarank_truncation_level": 20,
        "num_threads": config.threads,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


def fit_ranker(config: TrainConfig, train_set: TrainingSet, valid_set: TrainingSet) -> lgb.Booster:
    names = list(F.RANKER_FEATURES)
    train_data = lgb.Dataset(
        train_set.X,
        label=train_set.y,
        group=train_set.groups,
        feature_name=names,
        categorical_feature=list(F.CATEGORICAL_FEATURES),
        free_raw_data=False,
    )
    valid_groups = [g for g in valid_set.groups]
    callbacks: list[Callable[..., Any]] = [lgb.log_evaluation(0)]
    valid_sets = []
    if valid_groups and valid_set.y.max() > 0:
        valid_data = lgb.Dataset(
            valid_set.X,
            label=valid_set.y,
            group=valid_groups,
            reference=train_data,
            feature_name=names,
            categorical_feature=list(F.CATEGORICAL_FEATURES),
        )
        valid_sets = [valid_data]
        callbacks.append(lgb.early_stopping(config.early_stopping_rounds, verbose=False))
    return lgb.train(
        ranker_params(config),
        train_data,
        num_boost_round=config.num_boost_round,
        valid_sets=valid_sets,
        callbacks=callbacks,
    )
