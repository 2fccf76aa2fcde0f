"""What the visitor is likely to go to next, from the last items: scores over bounded neighbour lists, used by
the candidate generators (to propose) and by the ranker (as features), so both read the same numbers.

- next item: the co-visitation neighbours of the last NEXT_ITEM_HISTORY items, each older item weighing
  NEXT_ITEM_DECAY times less (the simple order-aware model public purchase histories are compared against);
- last item: the neighbours of the very last item alone (the strongest single transition);
- two steps: neighbours of the best next items, weighted by their score (what follows what follows);
- shared tags: items carrying the last items' specific tags (brand, fine category), rarer tags weigh more.

Everything is vectorised over bounded lists (neighbour lists, tag lists capped in the snapshot), so the cost
does not grow with the catalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.features.item_cache import ItemSnapshot

NEXT_ITEM_HISTORY = 5
NEXT_ITEM_DECAY = 0.6
TWO_STEP_SEEDS = 20  # the best next items whose own neighbours are followed
TAGS_PER_ITEM = 8  # an item's most specific tags only: the work per request stays bounded (tag lists: 300)
EMPTY = (np.zeros(0, dtype=np.int64), np.zeros(0))
# `lookup` and `_summed` work on a table over rows 0..the largest one when there are at most this many times
# more of them than rows at hand (cheaper than searching or sorting then; the work never grows with the catalog).
DENSE_FACTOR = 8
Sparse = tuple[np.ndarray, np.ndarray]  # (snapshot rows, sorted ascending and unique; scores)


@dataclass(frozen=True)
class NextItemScores:
    next_item: Sparse = EMPTY
    last_item: Sparse = EMPTY
    two_step: Sparse = EMPTY
    shared_tags: Sparse = EMPTY

    def ranked(self, name: str) -> np.ndarray:
        """Rows of one score, best first."""
        rows, values = getattr(self, name)
        return rows[np.argsort(-values, kind="stable")]

    def columns(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Ranker columns for the candidate rows `idx` (0 where a score does not reach a candidate)."""
        next_item = lookup(*self.next_item, idx)
        order = np.argsort(-next_item, kind="stable")
        rank = np.empty(len(idx))
        rank[order] = np.arange(len(idx), dtype=np.float64)
        rank[next_item <= 0] = np.nan
        return {
            "x_covisitation": next_item,
            "x_covisitation_rank": rank,
            "x_last_item_transition": lookup(*self.last_item, idx),
            "x_two_step": lookup(*self.two_step, idx),
            "x_shared_tags": lookup(*self.shared_tags, idx),
        }


def next_item_scores(snapshot: ItemSnapshot, recent: Sequence[str], per_item: int) -> NextItemScores:
    recent = list(recent[:NEXT_ITEM_HISTORY])
    if not recent:
        return NextItemScores()
    idx_parts, score_parts = [], []
    last_item = EMPTY
    for rank, item_id in enumerate(recent):
        neighbours = snapshot.covisitation.get(item_id)
        if neighbours is not None and len(neighbours[0]):
            rows, values = neighbours[0][:per_item], neighbours[1][:per_item]
            idx_parts.append(rows)
            score_parts.append(values * NEXT_ITEM_DECAY**rank)
            if rank == 0:
                last_item = _summed([rows], [values])
    next_item = _summed(idx_parts, score_parts)
    return NextItemScores(
        next_item=next_item,
        last_item=last_item,
        two_step=_two_step(snapshot, next_item, per_item),
        shared_tags=_shared_tags(snapshot, recent),
    )


def _two_step(snapshot: ItemSnapshot, first: Sparse, per_item: int) -> Sparse:
    rows, values = first
    if not len(rows):
        return EMPTY
    seeds = np.argsort(-values, kind="stable")[:TWO_STEP_SEEDS]
    ids = snapshot.ids
    idx_parts, score_parts = [], []
    for seed in seeds:
        neighbours = snapshot.covisitation.get(ids[int(rows[seed])])
        if neighbours is not None and len(neighbours[0]):
            idx_parts.append(neighbours[0][:per_item])
            score_parts.append(neighbours[1][:per_item] * values[seed])
    return _summed(idx_parts, score_parts)


def _shared_tags(snapshot: ItemSnapshot, recent: Sequence[str]) -> Sparse:
    idx_parts, score_parts = [], []
    for rank, item_id in enumerate(recent):
        row = snapshot.index.get(item_id)
        if row is None:
            continue
        weighted = [(snapshot.tag_weight[t], t) for t in snapshot.tags[row] if t in snapshot.tag_weight]
        for weight, tag in sorted(weighted, reverse=True)[:TAGS_PER_ITEM]:
            members = snapshot.by_tag[tag]
            idx_parts.append(members)
            score_parts.append(np.full(len(members), weight * NEXT_ITEM_DECAY**rank))
    if not idx_parts:
        return EMPTY
    rows, values = _summed(idx_parts, score_parts)
    # Among equally similar items the more popular first (the lists are capped by popularity too).
    popularity = snapshot.popularity_score[rows]
    return rows, values + 1e-3 * popularity / (popularity.max() + 1.0)


def _summed(idx_parts: list[np.ndarray], score_parts: list[np.ndarray]) -> Sparse:
    if not idx_parts:
        return EMPTY
    rows, scores = np.concatenate(idx_parts), np.concatenate(score_parts)
    top = int(rows.max()) + 1 if len(rows) else 0
    if 0 < top <= DENSE_FACTOR * len(rows):
        # Rows of a small catalogue: sums over every row instead of sorting (the same additions, in the same
        # order per row, so the same sums).
        unique = np.flatnonzero(np.bincount(rows, minlength=top))
        return unique, np.bincount(rows, weights=scores, minlength=top)[unique]
    unique, inverse = np.unique(rows, return_inverse=True)
    return unique, np.bincount(inverse, weights=scores)


def lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[keys == wanted] per wanted row, 0 where absent (`keys` sorted, as np.unique returns them)."""
    out = np.zeros(len(wanted))
    if len(keys) == 0 or len(wanted) == 0:
        return out
    top = max(int(keys[-1]), int(wanted.max())) + 1
    if top <= DENSE_FACTOR * (len(keys) + len(wanted)):
        # Rows of a small catalogue: a table over every row is cheaper than a binary search per wanted row.
        table = np.zeros(top)
        table[keys] = values
        return table[wanted]
    # searchsorted never returns a negative position: only the end needs capping (np.clip costs far more).
    position = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[position] == wanted
    out[found] = values[position[found]]
    return out
