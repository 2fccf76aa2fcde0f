"""Stage three: business rules after scoring (stock, not just bought, diversity, no repeats across slots,
merchandiser pins and boosts, hard targeting of banners and CTAs)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from services.common.catalog import Targeting
from services.features.item_cache import ItemSnapshot


@dataclass(frozen=True)
class RuleContext:
    hour: int
    device: str | None
    city: str | None
    is_payday_window: bool


def targeting_allows(targeting: Targeting | None, ctx: RuleContext) -> bool:
    """Hard targeting: device, city, hour and payday constraints must hold when they are set."""
    if targeting is None:
        return True
    if targeting.devices and (ctx.device or "") not in targeting.devices:
        return False
    if targeting.cities and (ctx.city or "").lower() not in {c.lower() for c in targeting.cities}:
        return False
    if targeting.hours and ctx.hour not in targeting.hours:
        return False
    return not (targeting.payday_only and not ctx.is_payday_window)


def apply_rules(
    snapshot: ItemSnapshot,
    idx: np.ndarray,
    scores: np.ndarray,
    count: int,
    exclude_ids: set[str],
    just_bought: Iterable[str] = (),
    max_per_category: int | None = None,
    max_pinned: int = 1,
) -> list[tuple[int, float]]:
    """Pick `count` rows: pinned first, then by boosted score, skipping excluded, bought and over-quota items.

    At most `max_pinned` pinned items (the best-scored ones) jump the queue; further pinned items compete on
    score like any other, so a merchandiser's pins cannot crowd out every personal pick."""
    if len(idx) == 0:
        return []
    boosted = scores + snapshot.log_boost[idx]
    pinned = snapshot.pinned[idx].copy()
    n_pinned = int(np.count_nonzero(pinned))
    if n_pinned > max_pinned:
        pinned_rows = np.flatnonzero(pinned)
        pinned[:] = False
        pinned[pinned_rows[np.argsort(-boosted[pinned_rows], kind="stable")[:max_pinned]]] = True
    # Pinned items first (stable among themselves by score), then everything else by score. Without pins
    # that is the stable order by score alone, which one argsort gives at a fraction of lexsort's cost.
    order = np.lexsort((-boosted, ~pinned)) if n_pinned else np.argsort(-boosted, kind="stable")
    bought = set(just_bought)
    per_category: dict[str, int] = {}
    chosen: list[tuple[int, float]] = []
    # Read in chunks of the order: the rules mostly stop after about `count` items, and converting all of a
    # few hundred candidates to Python values cost more than the loop itself.
    step = max(2 * count, 32)
    for start in range(0, len(order), step):
        part = order[start : start + step]
        for i, value in zip(idx[part].tolist(), boosted[part].tolist(), strict=True):
            item_id = snapshot.ids[i]
            if item_id in exclude_ids or item_id in bought:
                continue
            category = snapshot.categories[i]
            if max_per_category is not None and category is not None:
                if per_category.get(category, 0) >= max_per_category:
                    continue
                per_category[category] = per_category.get(category, 0) + 1
            chosen.append((i, value))
            if len(chosen) >= count:
                return chosen
    return chosen
