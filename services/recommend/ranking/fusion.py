"""Stage one and a half: learned score fusion, the cut from a large candidate pool to the served count.

The generators propose a pool several times the served count (budgets scaled up, about 1,500 items); on public
purchase histories that pool holds the next item far more often than the first 500 in priority order, but a
fixed fusion (reciprocal ranks) keeps little of the difference. Here every pooled candidate is scored by a
logistic regression over what the generators computed anyway (each generator's rank for it, how many proposed
it, the next-item, two-step, tag and embedding scores, popularity) and the best `max_candidates` go on to the
LightGBM ranker. The weights are learned at training time on "is the next item" labels of the ranker's own
training queries, saved with the ranker (a companion blob in the model registry) and loaded with it, so
training and serving cut the pool with the same numbers. Scoring is one matrix-vector product (no sklearn at
serving: the service never imports it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

# Columns the ranker already reads for every candidate (services/recommend/ranking/next_item.py and
# item_embeddings.py), used here as well.
SIGNAL_COLUMNS = (
    "x_covisitation",
    "x_last_item_transition",
    "x_two_step",
    "x_shared_tags",
    "x_embedding",
    "x_embedding_last",
)
# Non-negative scores with long tails: their logarithm is what a linear model can weigh.
LOG_SIGNALS = frozenset({"x_covisitation", "x_last_item_transition", "x_two_step", "x_shared_tags"})
FUSION_QUERIES = 6000  # training queries the weights are fitted on (a linear model needs few)
FUSION_NEGATIVES = 300  # negatives sampled per query (the cut ranks within a query: the intercept is moot)


class FusionFileError(ValueError):
    """Stored fusion weights that cannot be read or do not match this code's features."""


def feature_names(sources: Sequence[str]) -> tuple[str, ...]:
    per_source = [f"{kind}_{source}" for source in sources for kind in ("in", "top", "log_rank")]
    return (*per_source, "n_sources", *SIGNAL_COLUMNS, "log_popularity")


def fusion_features(best_rank: np.ndarray, signals: Mapping[str, np.ndarray], popularity: np.ndarray) -> np.ndarray:
    """One row per pooled candidate. `best_rank`: (candidates, sources), the candidate's best position in each
    generator's list (inf where that generator did not propose it)."""
    proposed = np.isfinite(best_rank)
    rank = np.where(proposed, best_rank, 0.0)
    per_source = np.stack([proposed.astype(np.float64), proposed / (1.0 + rank / 10.0), np.log1p(rank)], axis=2)
    columns = [per_source.reshape(len(best_rank), -1), proposed.sum(axis=1, keepdims=True).astype(np.float64)]
    for name in SIGNAL_COLUMNS:
        values = np.nan_to_num(np.asarray(signals.get(name, np.zeros(len(best_rank))), dtype=np.float64))
        columns.append((np.log1p(np.maximum(values, 0.0)) if name in LOG_SIGNALS else values)[:, None])
    columns.append(np.log1p(np.maximum(popularity, 0.0))[:, None])
    return np.hstack(columns)


@dataclass(frozen=True)
class CandidateFusion:
    """Learned weights of the pool's cut. `pool`: how many candidates the generators propose before it."""

    pool: int
    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray

    def score(self, X: np.ndarray) -> np.ndarray:
        # einsum, not BLAS: a plain loop on the request's thread (see ItemEmbeddings.scores).
        return np.einsum("ij,j->i", (X - self.mean) / self.scale, self.weights)

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, pool: int, sources: Sequence[str], seed: int = 7) -> CandidateFusion:
        """Logistic regression on standardised features. Raises ValueError without both labels."""
        from sklearn.linear_model import LogisticRegression  # training only

        names = feature_names(sources)
        if X.shape[1] != len(names):
            raise ValueError(f"fusion features: {X.shape[1]} columns for {len(names)} names")
        if len(np.unique(y)) < 2:
            raise ValueError("fusion needs queries whose next item is in the pool and others that are not")
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale < 1e-9] = 1.0  # a constant column (a generator that never ran) weighs nothing
        model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
        model.fit((X - mean) / scale, y)
        return cls(pool, names, mean, scale, np.asarray(model.coef_[0], dtype=np.float64))

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "pool": self.pool,
                "names": list(self.names),
                "mean": self.mean.tolist(),
                "scale": self.scale.tolist(),
                "weights": self.weights.tolist(),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes, sources: Sequence[str]) -> CandidateFusion:
        """Refuses weights whose features differ from what this code computes for `sources`."""
        try:
            data = orjson.loads(raw)
            fusion = cls(
                int(data["pool"]),
                tuple(str(n) for n in data["names"]),
                np.asarray(data["mean"], dtype=np.float64),
                np.asarray(data["scale"], dtype=np.float64),
                np.asarray(data["weights"], dtype=np.float64),
            )
        except Exception as exc:
            raise FusionFileError(f"fusion weights unreadable: {type(exc).__name__}") from exc
        expected = feature_names(sources)
        if fusion.names != expected:
            raise FusionFileError(f"fusion weights are for other features ({len(fusion.names)} != {len(expected)})")
        if not (len(fusion.mean) == len(fusion.scale) == len(fusion.weights) == len(expected)) or fusion.pool < 1:
            raise FusionFileError("fusion weights: lengths do not match the features")
        return fusion
