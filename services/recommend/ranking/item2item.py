"""Item-to-item neighbours of anchor items (a product page's item, a cart's items), read from the snapshot the
recommend service already holds (pure, no I/O):

- "bought_together": the co-visitation index the aggregator maintains (services/features/indexes.py): what
  visitors interacted with after (and, more weakly, before) the anchor, every interaction type counted, rows
  damped by the square root of their total as the snapshot serves them;
- "similar": attribute neighbours (the anchor's specific tags weighted by rarity, its brand and category), with
  co-visitation as a weaker second signal so that, among equally similar items, those shoppers actually
  compare come first.

Both return snapshot rows best first, never an anchor, and say which anchor each neighbour came from (for the
explanation "often bought together with X"). The same function serves `/v1/recommend` slots,
`GET /v1/items/{item_id}/similar` and the offline evaluation (services/recommend/training/item2item_eval.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.features.item_cache import ItemSnapshot

Strategy = Literal["similar", "bought_together"]
STRATEGIES: tuple[Strategy, ...] = ("similar", "bought_together")
PER_ANCHOR = 100  # neighbours read per anchor: the ranker re-orders at most this many per anchor
TAGS_PER_ANCHOR = 8  # the anchor's most specific tags (tag lists are capped at 300 items in the snapshot)
# Attribute weights relative to the anchor's tags (whose weights are normalised to sum to 1): sharing the brand
# or the category alone makes an item a weak neighbour, sharing rare tags a strong one.
BRAND_WEIGHT = 0.3
CATEGORY_WEIGHT = 0.2
# In "similar", co-visitation (scaled to at most 1 per anchor) breaks ties between equally similar items.
SIMILAR_COVISIT_WEIGHT = 0.25
POPULARITY_TIE_BREAK = 1e-6


@dataclass(frozen=True)
class Neighbours:
    idx: np.ndarray  # snapshot rows, best first
    scores: np.ndarray  # the strategy's score per row (higher is closer)
    via: np.ndarray  # per row, the position in `anchors` of the anchor that contributed most

    def __len__(self) -> int:
        return len(self.idx)


EMPTY = Neighbours(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64))


def neighbours(
    snapshot: ItemSnapshot,
    anchors: Sequence[int],
    strategy: Strategy,
    eligible: np.ndarray | None = None,
    limit: int = PER_ANCHOR,
) -> Neighbours:
    """The neighbours of the anchor rows, summed over anchors, best first, at most `limit`. `eligible`: a mask
    over snapshot rows (availability, kind, filters); anchors are removed whatever it says."""
    if not anchors:
        return EMPTY
    per_anchor = [
        _bought_together(snapshot, row) if strategy == "bought_together" else _similar(snapshot, row) for row in anchors
    ]
    rows = np.concatenate([r for r, _ in per_anchor])
    if not len(rows):
        return EMPTY
    values = np.concatenate([v for _, v in per_anchor])
    owner = np.concatenate([np.full(len(r), k, dtype=np.int64) for k, (r, _) in enumerate(per_anchor)])
    unique, inverse = np.unique(rows, return_inverse=True)
    total = np.bincount(inverse, weights=values, minlength=len(unique))
    # The anchor that contributed most to each row: sort contributions by (row, -value), take each row's first.
    order = np.lexsort((-values, inverse))
    first = np.ones(len(order), dtype=bool)
    first[1:] = inverse[order][1:] != inverse[order][:-1]
    via = owner[order][first]
    keep = ~np.isin(unique, np.asarray(anchors, dtype=np.int64))
    if eligible is not None:
        keep &= eligible[unique]
    unique, total, via = unique[keep], total[keep], via[keep]
    total = total + POPULARITY_TIE_BREAK * np.log1p(snapshot.popularity_score[unique])
    best = np.argsort(-total, kind="stable")[:limit]
    return Neighbours(unique[best], total[best], via[best])


def _bought_together(snapshot: ItemSnapshot, row: int) -> tuple[np.ndarray, np.ndarray]:
    listed = snapshot.covisitation.get(snapshot.ids[row])
    if listed is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return listed[0][:PER_ANCHOR], listed[1][:PER_ANCHOR]


def _similar(snapshot: ItemSnapshot, row: int) -> tuple[np.ndarray, np.ndarray]:
    parts: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    tagged = sorted(
        ((snapshot.tag_weight[t], t) for t in snapshot.tags[row] if t in snapshot.tag_weight), reverse=True
    )[:TAGS_PER_ANCHOR]
    tag_total = sum(w for w, _ in tagged) or 1.0
    for weight, tag in tagged:
        members = snapshot.by_tag[tag]
        parts.append(members)
        weights.append(np.full(len(members), weight / tag_total))
    # Brand and category lists are ordered by popularity: their heads stand in for the whole list.
    for listed, weight in (
        (snapshot.by_brand.get(snapshot.brands[row] or ""), BRAND_WEIGHT),
        (snapshot.by_category.get(snapshot.categories[row] or ""), CATEGORY_WEIGHT),
    ):
        if listed is not None:
            parts.append(listed[:PER_ANCHOR])
            weights.append(np.full(len(parts[-1]), weight))
    covisited = _bought_together(snapshot, row)
    if len(covisited[0]):
        parts.append(covisited[0])
        weights.append(SIMILAR_COVISIT_WEIGHT * covisited[1] / covisited[1].max())
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    unique, inverse = np.unique(np.concatenate(parts), return_inverse=True)
    summed = np.bincount(inverse, weights=np.concatenate(weights), minlength=len(unique))
    best = np.argsort(-summed, kind="stable")[: 3 * PER_ANCHOR]
    return unique[best], summed[best]
