"""Business rules after scoring: pins, boosts, diversity, exclusions."""

from __future__ import annotations

import numpy as np

from services.features.item_cache import build_snapshot
from services.recommend.ranking.rules import apply_rules
from tests.factories import BASE_TIME, make_item


def test_only_the_best_pin_jumps_the_queue_and_boosts_add_to_the_score() -> None:
    items = [
        make_item(item_id="a", category="c1"),
        make_item(item_id="b", category="c2", pinned=True),
        make_item(item_id="c", category="c3", pinned=True),
        make_item(item_id="d", category="c4", boost=np.e**2),
    ]
    snapshot = build_snapshot(items, {}, {}, {}, now=BASE_TIME.timestamp())
    idx = np.arange(4)
    scores = np.array([3.0, 1.0, 0.5, 0.0])
    chosen = apply_rules(snapshot, idx, scores, count=4, exclude_ids=set(), max_pinned=1)
    ids = [snapshot.ids[i] for i, _ in chosen]
    assert ids[0] == "b"  # the better-scored pin
    assert ids[1:] == ["a", "d", "c"]  # d: 0 + ln(e^2) = 2 beats c's 0.5; c competes on score
    assert chosen[2][1] == 2.0
    two = [snapshot.ids[i] for i, _ in apply_rules(snapshot, idx, scores, 4, set(), max_pinned=2)]
    assert two[:2] == ["b", "c"]


def test_exclusions_bought_items_and_category_quota() -> None:
    items = [make_item(item_id=f"i{n}", category="same" if n < 4 else "other") for n in range(6)]
    snapshot = build_snapshot(items, {}, {}, {}, now=BASE_TIME.timestamp())
    scores = np.arange(6, 0, -1, dtype=float)
    chosen = apply_rules(
        snapshot, np.arange(6), scores, count=5, exclude_ids={"i0"}, just_bought=["i1"], max_per_category=1
    )
    assert [snapshot.ids[i] for i, _ in chosen] == ["i2", "i4"]


def test_without_pins_equal_scores_keep_the_candidates_order() -> None:
    items = [make_item(item_id=f"t{n}", category=f"c{n}") for n in range(6)]
    snapshot = build_snapshot(items, {}, {}, {}, now=BASE_TIME.timestamp())
    idx = np.array([4, 1, 5, 0, 3, 2])
    scores = np.array([1.0, 2.0, 1.0, 2.0, 1.0, 0.5])
    chosen = apply_rules(snapshot, idx, scores, count=6, exclude_ids=set())
    assert [i for i, _ in chosen] == [1, 0, 4, 5, 3, 2]  # ties in the order they were proposed


def test_rules_read_past_many_skipped_candidates() -> None:
    """Items skipped by the rules (seen, bought, over the category quota) do not end the list early."""
    items = [make_item(item_id=f"s{n}", category="one" if n < 80 else f"c{n}") for n in range(100)]
    snapshot = build_snapshot(items, {}, {}, {}, now=BASE_TIME.timestamp())
    idx = np.arange(100)
    scores = -np.arange(100, dtype=np.float64)  # candidate order
    shown = {f"s{n}" for n in range(1, 40)}
    chosen = apply_rules(snapshot, idx, scores, 3, shown, just_bought={"s85"}, max_per_category=2)
    assert [snapshot.ids[i] for i, _ in chosen] == ["s0", "s40", "s80"]
    assert [v for _, v in chosen] == [0.0, -40.0, -80.0]
