"""Training the ranker on a Dask cluster with `lightgbm.dask` (data-parallel LightGBM), nothing home-made.

The training set is built exactly as for single-machine training (`Trainer`: the log, Feast's point-in-time
features, the serving candidate generators); only the fit differs. The rows go to the workers as partitions cut
on query-group boundaries, so a group never spans two partitions (LightGBM's ranking objective needs each
group whole on one worker). Early stopping is not available in `lightgbm.dask`: every round is trained with the
validation set evaluated, and the model keeps the best round on it, which is what early stopping picks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np

from services.features import schema as F
from services.recommend.repository import RecommendRepository
from services.recommend.training.fit import TrainingSet
from services.recommend.training.train import Progress, TrainConfig, Trainer

if TYPE_CHECKING:
    import dask.array as da
    from distributed import Client

log = logging.getLogger(__name__)


def group_partitions(groups: Sequence[int], partitions: int) -> list[tuple[int, int]]:
    """Cut the query groups into at most `partitions` contiguous runs of about equal rows: (first, end) indexes."""
    if not groups:
        return []
    sizes = np.asarray(groups, dtype=np.int64)
    total = int(sizes.sum())
    wanted = max(1, min(partitions, len(groups)))
    ends = np.cumsum(sizes)
    cuts = [0]
    for k in range(1, wanted):
        # The first group whose end reaches k/wanted of the rows closes partition k.
        cut = int(np.searchsorted(ends, total * k / wanted)) + 1
        if cuts[-1] < cut < len(groups):
            cuts.append(cut)
    cuts.append(len(groups))
    return [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]


def to_dask(data: TrainingSet, partitions: int) -> tuple[da.Array, da.Array, da.Array]:
    """X, y and group as dask arrays whose chunks follow the group-aligned partitions."""
    import dask.array as da

    runs = group_partitions(data.groups, partitions)
    groups = np.asarray(data.groups, dtype=np.int64)
    group_chunks = tuple(end - first for first, end in runs)
    row_chunks = tuple(int(groups[first:end].sum()) for first, end in runs)
    X = da.from_array(data.X, chunks=(row_chunks, data.X.shape[1]))
    y = da.from_array(data.y, chunks=(row_chunks,))
    group = da.from_array(groups, chunks=(group_chunks,))
    return X, y, group


def present_categoricals(data: TrainingSet) -> list[str]:
    """The categorical features with at least one value in the training set.

    A categorical column that is missing everywhere (e.g. personas before the first persona model) makes
    distributed LightGBM 4.7 crash a worker while the machines agree on bins; it can never be split on, so
    leaving it out of the categorical list changes nothing in the model."""
    present = ~np.all(np.isnan(data.X), axis=0) if len(data.X) else np.zeros(len(F.RANKER_FEATURES), dtype=bool)
    return [name for name in F.CATEGORICAL_FEATURES if present[F.RANKER_FEATURES.index(name)]]


def workers_of(client: Client) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


class DaskTrainer(Trainer):
    """`Trainer` whose fit runs on the Dask cluster behind `client` (`DaskLGBMRanker`)."""

    def __init__(
        self,
        repository: RecommendRepository,
        config: TrainConfig,
        client: Client,
        progress: Progress | None = None,
        partitions_per_worker: int = 2,
    ):
        super().__init__(repository, config, progress)
        self.client = client
        self.partitions_per_worker = partitions_per_worker

    def dask_params(self) -> dict[str, Any]:
        """The single-machine parameters in the estimator's vocabulary (same objective, trees and seed)."""
        params = self.params()
        params.pop("ndcg_eval_at")  # passed to fit as eval_at
        params["n_estimators"] = self.config.num_boost_round
        # Each worker is one LightGBM machine: its threads are the worker's, not the whole cluster's.
        params["num_threads"] = self.config.threads
        return params

    def fit(self, train_set: TrainingSet, valid_set: TrainingSet) -> lgb.Booster:
        from lightgbm.dask import DaskLGBMRanker

        partitions = workers_of(self.client) * self.partitions_per_worker
        X, y, group = to_dask(train_set, partitions)
        fit_args: dict[str, Any] = {
            "group": group,
            "feature_name": list(F.RANKER_FEATURES),
            "categorical_feature": present_categoricals(train_set),
            "eval_at": [10],
        }
        evaluate = bool(valid_set.groups) and float(valid_set.y.max(initial=0)) > 0
        if evaluate:
            Xv, yv, gv = to_dask(valid_set, partitions)
            fit_args.update(eval_set=[(Xv, yv)], eval_group=[gv], eval_names=["valid"])
        log.info("training on dask: %d rows in %d partitions", train_set.X.shape[0], X.numblocks[0])
        model = DaskLGBMRanker(client=self.client, **self.dask_params())
        model.fit(X, y, **fit_args)
        booster: lgb.Booster = model.booster_
        if evaluate:
            curve = model.evals_result_["valid"]["ndcg@10"]
            # LightGBM's early stopping keeps the first best round; argmax does the same.
            booster.best_iteration = int(np.argmax(curve)) + 1
        return booster


def connect(scheduler: str) -> Client:
    """A client of the Dask scheduler at `scheduler` (tcp://host:8786)."""
    from distributed import Client

    return Client(scheduler, timeout="30s")
