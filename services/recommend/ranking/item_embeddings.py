"""Item embeddings learned from who interacted with what: the generator that generalises beyond exact
co-occurrence. Co-visitation only links items seen within a few steps of each other; two items bought by
similar people but never next to each other get no link there, and on public purchase histories the next item
is often such an item.

Fit: a truncated SVD of the visitor x item matrix (each interaction once, rows and columns damped by the
square root of their totals so popular items and heavy visitors do not dominate), by randomised SVD:
memory grows with the interactions and `items x dim`, never `items x items`, so 100,000-item catalogs fit.
Serve: the visitor's last items (recency-weighted) summed into one query vector; the score of every item is
a dot product with it (one matrix-vector product over the catalog per request) and the generator proposes
the best ones. `selaras train --histories` fits them and saves them with the ranker (they are part of the
model: the ranker's `x_embedding*` columns read them), the service loads them with the model.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from services.features.item_cache import ItemSnapshot

EMBEDDING_DIM = 64
EMBEDDING_HISTORY = 20  # the visitor's last items that form the query
EMBEDDING_DECAY = 0.8  # each older item weighs this much less
# The recency weights as the float32 factors the query is summed with (the k-th latest item weighs DECAY**k).
DECAY_WEIGHTS = np.array([np.float32(EMBEDDING_DECAY**rank) for rank in range(EMBEDDING_HISTORY)], dtype=np.float32)
RANDOMIZED_SVD_PASSES = 6


class EmbeddingFileError(ValueError):
    """Stored embeddings that cannot be read."""


@dataclass(frozen=True)
class EmbeddingScores:
    """One request's scores: `top` proposes candidates (snapshot rows sorted ascending, scores); `vectors`
    and `query` give the ranker's columns for any candidate rows. Shared by the slots of a request: read only."""

    top: tuple[np.ndarray, np.ndarray]
    query: np.ndarray
    last: np.ndarray  # the last item's vector (the similarity to it is a column of its own)
    vectors: np.ndarray  # aligned to snapshot rows

    def ranked(self) -> np.ndarray:
        rows, values = self.top
        return rows[descending(values)]

    def columns(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        if len(idx) == 0:
            return {name: np.zeros(0) for name in ("x_embedding", "x_embedding_rank", "x_embedding_last")}
        candidates = self.vectors[idx]
        score = candidates @ self.query
        rank = np.empty(len(idx))
        rank[descending(score)] = np.arange(len(idx), dtype=np.float64)
        return {
            "x_embedding": score.astype(np.float64),
            "x_embedding_rank": rank,
            "x_embedding_last": (candidates @ self.last).astype(np.float64),
        }


def descending(values: np.ndarray) -> np.ndarray:
    """Positions by decreasing value, ties in position order: `np.argsort(-values, kind="stable")`, in a third
    of its time. The default sort is several times faster than the stable one but orders ties arbitrarily, so
    the stable sort runs only when the sorted values hold a tie (rare with float scores)."""
    order = np.argsort(-values)
    ordered = values[order]
    # NaN sorts last in both, but NaNs among themselves in any order: a NaN is handled like a tie.
    if len(ordered) > 1 and ((ordered[1:] == ordered[:-1]).any() or np.isnan(ordered[-1])):
        return np.argsort(-values, kind="stable")
    return order


@dataclass
class ItemEmbeddings:
    ids: tuple[str, ...]
    vectors: np.ndarray  # float32, one row per id
    # The vectors re-ordered to the rows of the catalog last seen, by the identity of its id list: the snapshot
    # rebuilt on every refresh keeps the catalog's list until the catalog changes. (Holding the list also keeps
    # its identity from being reused by another list.)
    _aligned: tuple[list[str], np.ndarray] | None = field(default=None, repr=False, compare=False)
    # The last scores asked for, by (aligned vectors, recent items, top): the product slots of one request score
    # the same visitor, and compute the scores once.
    _last: tuple[tuple[np.ndarray, tuple[str, ...], int], EmbeddingScores | None] | None = field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def fit(cls, sequences: Sequence[Sequence[str]], dim: int = EMBEDDING_DIM) -> ItemEmbeddings | None:
        """None when there is too little to learn from (fewer items or visitors than dimensions + 1)."""
        index: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        for user, sequence in enumerate(sequences):
            # First-seen order, not set order: a set of strings iterates in an order that changes with the
            # process's hash seed, which permuted the matrix's columns and so the randomised SVD's result.
            for item in dict.fromkeys(sequence):
                rows.append(user)
                cols.append(index.setdefault(item, len(index)))
        from sklearn.utils.extmath import randomized_svd  # training only: the service never imports it

        k = min(dim, len(index) - 1, len(sequences) - 1)
        if k < 1:
            return None
        matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(len(sequences), len(index)))
        user_total = np.asarray(matrix.sum(axis=1)).ravel()
        item_total = np.asarray(matrix.sum(axis=0)).ravel()
        damped = sp.diags(1.0 / np.sqrt(user_total + 1.0)) @ matrix @ sp.diags(1.0 / np.sqrt(item_total + 1.0))
        # Randomised SVD: a fixed number of passes over the interactions (ARPACK's svds can take minutes to
        # converge on flat spectra), and a fixed seed: the same histories give the same embeddings.
        _, singular, vt = randomized_svd(damped, n_components=k, n_iter=RANDOMIZED_SVD_PASSES, random_state=0)
        vectors = (vt.T * np.sqrt(singular)).astype(np.float32)
        return cls(tuple(index), vectors)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, ids=np.array("\n".join(self.ids).encode()), vectors=self.vectors)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ItemEmbeddings:
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                ids = tuple(bytes(data["ids"]).decode().split("\n"))
                vectors = np.asarray(data["vectors"], dtype=np.float32)
        except Exception as exc:
            raise EmbeddingFileError(f"item embeddings unreadable: {type(exc).__name__}") from exc
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise EmbeddingFileError(f"item embeddings: {len(ids)} ids for a {vectors.shape} matrix")
        return cls(ids, vectors)

    def aligned(self, snapshot: ItemSnapshot) -> np.ndarray:
        """The vectors by snapshot row (zeros for items the embeddings never saw), cached per catalog."""
        cached = self._aligned
        if cached is not None and cached[0] is snapshot.ids and len(cached[1]) == snapshot.size:
            return cached[1]
        out = np.zeros((snapshot.size, self.vectors.shape[1]), dtype=np.float32)
        mine = [(snapshot.index[i], n) for n, i in enumerate(self.ids) if i in snapshot.index]
        if mine:
            rows, positions = np.array(mine, dtype=np.int64).T
            out[rows] = self.vectors[positions]
        self._aligned = (snapshot.ids, out)
        return out

    def scores(self, snapshot: ItemSnapshot, recent: Sequence[str], top: int) -> EmbeddingScores | None:
        """None when none of the recent items has a vector."""
        vectors = self.aligned(snapshot)
        key = (vectors, tuple(recent[:EMBEDDING_HISTORY]), top)
        last_asked = self._last
        if last_asked is not None and last_asked[0][0] is vectors and last_asked[0][1:] == key[1:]:
            return last_asked[1]
        scores = self._scores(snapshot, vectors, key[1], top)
        self._last = (key, scores)
        return scores

    @staticmethod
    def _scores(
        snapshot: ItemSnapshot, vectors: np.ndarray, recent: tuple[str, ...], top: int
    ) -> EmbeddingScores | None:
        found = [(rank, row) for rank, row in enumerate(map(snapshot.index.get, recent)) if row is not None]
        if not found:
            return None
        ranks, rows = np.array(found, dtype=np.int64).T
        # The weighted vectors summed over axis 0 are added one row after the other, latest first: the float32
        # sum an item-by-item loop computes, bit for bit, without a Python loop over the items.
        query = (vectors[rows] * DECAY_WEIGHTS[ranks, None]).sum(axis=0)
        if not query.any():
            return None
        last = vectors[rows[0]] if ranks[0] == 0 else np.zeros(vectors.shape[1], dtype=np.float32)
        # einsum, not BLAS: one plain loop on the request's thread. OpenBLAS spreads a matrix-vector product
        # over its own threads, which on a busy machine waited for a free core (22 ms instead of 0.3).
        values = np.einsum("ij,j->i", vectors, query)
        k = min(top, len(values))
        best = np.sort(np.argpartition(-values, k - 1)[:k]) if k else np.zeros(0, dtype=np.int64)
        return EmbeddingScores(
            (best.astype(np.int64, copy=False), values[best].astype(np.float64)), query, last, vectors
        )
