"""Ranking quality metrics for one relevant item per query (offline evaluation and training reports)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def rank_of(target: str, ranked: Sequence[str]) -> int | None:
    """0-based rank of the target, None when it was not ranked at all (a miss)."""
    try:
        return ranked.index(target)
    except ValueError:
        return None


def ndcg_at(rank: int | None, k: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank is not None and rank < k else 0.0


def hit_at(rank: int | None, k: int) -> float:
    return 1.0 if rank is not None and rank < k else 0.0


def mrr_at(rank: int | None, k: int) -> float:
    return 1.0 / (rank + 1) if rank is not None and rank < k else 0.0


def summarize(ranks: Iterable[int | None], ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    values = list(ranks)
    n = len(values) or 1
    out: dict[str, float] = {"queries": float(len(values))}
    for k in ks:
        out[f"hr@{k}"] = sum(hit_at(r, k) for r in values) / n
        out[f"ndcg@{k}"] = sum(ndcg_at(r, k) for r in values) / n
        out[f"mrr@{k}"] = sum(mrr_at(r, k) for r in values) / n
    return out
