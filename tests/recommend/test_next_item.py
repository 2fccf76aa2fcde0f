"""Next-item scores: the simple order-aware model's arithmetic, two steps ahead, shared specific tags, and the
same ranker columns whether the generators propose a candidate (serving, behaviour training) or a logged
impression is scored (impression training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.features.indexes import CoVisitation
from services.features.item_cache import build_snapshot
from services.recommend.ranking import next_item
from services.recommend.ranking.candidates import CandidateGenerator, Filters, VisitorVector
from services.recommend.ranking.next_item import NEXT_ITEM_DECAY, TAGS_PER_ITEM, _summed, lookup, next_item_scores
from tests.factories import BASE_TIME, make_item


def snapshot_and_visitor() -> tuple[object, VisitorVector]:
    items = [make_item(item_id=f"i{n}", tags=[f"t{n % 40}", "common"]) for n in range(200)]
    covisitation = CoVisitation()
    for sequence in (["i1", "i2", "i3"], ["i1", "i2", "i4"], ["i2", "i5"], ["i5", "i6"]):
        previous: list[str] = []
        for item in sequence:
            covisitation.observe(previous, item)
            previous.insert(0, item)
    lists = {item: covisitation.top(item, 60) for item in covisitation.neighbours}
    snapshot = build_snapshot(items, {}, lists, {}, now=BASE_TIME.timestamp())
    row = {"event_count": 3, "recent_items": ["i2", "i1"]}
    return snapshot, VisitorVector.from_row("v", row)


def test_next_item_score_is_the_damped_decayed_transition_sum() -> None:
    snapshot, visitor = snapshot_and_visitor()
    scores = next_item_scores(snapshot, visitor.recent_items, 60)  # type: ignore[arg-type]
    rows, values = scores.next_item
    by_id = {snapshot.ids[r]: v for r, v in zip(rows, values, strict=True)}  # type: ignore[attr-defined]
    # i2 -> i3 (1), i2 -> i4 (1), i2 -> i5 (1), reverse i2 -> i1 (0.5 x 2): row total 4, damped by 2.
    # i1 (one step older, x0.6) -> i3 and i4 at distance 2 (0.5 each), -> i2 (2): total 3.
    i1_total, i2_total = 3.0, 4.0
    assert by_id["i3"] == pytest.approx(1 / math.sqrt(i2_total) + NEXT_ITEM_DECAY * 0.5 / math.sqrt(i1_total))
    assert by_id["i5"] == pytest.approx(1 / math.sqrt(i2_total))
    assert by_id["i1"] == pytest.approx(1.0 / math.sqrt(i2_total))  # seen items are excluded by filters, not here
    two_step = dict(zip(scores.two_step[0].tolist(), scores.two_step[1].tolist(), strict=True))
    assert snapshot.index["i6"] in two_step  # type: ignore[attr-defined]  # i2 -> i5 -> i6


def test_shared_tags_use_only_specific_tags_and_at_most_a_few_per_item() -> None:
    snapshot, visitor = snapshot_and_visitor()
    tagged = next_item_scores(snapshot, visitor.recent_items, 60).shared_tags  # type: ignore[arg-type]
    members = {snapshot.ids[r] for r in tagged[0]}  # type: ignore[attr-defined]
    # "common" is on every item (not specific); t2 (i2's tag) and t1 (i1's) are on 5 of 200 items each.
    assert "common" not in snapshot.tag_weight  # type: ignore[attr-defined]
    assert members == {f"i{n}" for n in range(200) if n % 40 in (1, 2)}
    # 30 specific tags on an item (each shared by 30 of 1,000 items): only its TAGS_PER_ITEM rarest are followed.
    many = [make_item(item_id=f"m{n}", tags=[f"x{k}" for k in range(n, n + 30)]) for n in range(1000)]
    big = build_snapshot(many, {}, {}, {}, now=BASE_TIME.timestamp())
    assert len(big.tag_weight) > 900
    rows = next_item_scores(big, ["m500"], 60).shared_tags[0]
    assert 30 < len(rows) <= TAGS_PER_ITEM * 30


def test_the_ranker_columns_of_a_candidate_do_not_depend_on_who_proposed_it() -> None:
    snapshot, visitor = snapshot_and_visitor()
    generator = CandidateGenerator(30)
    candidates = generator.products(snapshot, visitor, ["all"], Filters())  # type: ignore[arg-type]
    assert candidates.sources[0] == "covisitation"
    logged = generator.signals(snapshot, visitor, candidates.idx)  # type: ignore[arg-type]
    for name, values in candidates.signals.items():
        if name != "x_generator":
            np.testing.assert_array_equal(values, logged[name], err_msg=name)
    assert np.isnan(logged["x_generator"]).all()


def test_sums_and_lookups_are_the_same_by_table_and_by_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small catalogues go through a table over every row, large ones through sorting and binary search: both
    give the same rows and bit-identical values (the ranker's columns must not depend on the catalogue's size)."""
    rng = np.random.default_rng(5)
    catalogue = 300
    parts = [rng.choice(catalogue, size=60, replace=False) for _ in range(8)]
    scores = [rng.random(60) * NEXT_ITEM_DECAY**k for k in range(8)]
    wanted = rng.choice(catalogue, size=200, replace=False)
    wanted[:50] = parts[0][:50]  # half found, half not

    summed, looked_up = _summed(parts, scores), lookup(*_summed(parts, scores), wanted)
    monkeypatch.setattr(next_item, "DENSE_FACTOR", 0)  # searching and sorting only
    searched_sum = _summed(parts, scores)
    searched = lookup(*searched_sum, wanted)

    assert np.array_equal(summed[0], searched_sum[0])
    assert summed[1].tobytes() == searched_sum[1].tobytes()
    assert looked_up.tobytes() == searched.tobytes()
    assert np.count_nonzero(looked_up) >= 50 and np.all(looked_up[50:][~np.isin(wanted[50:], summed[0])] == 0)
    # Rows proposed several times are summed in the order they came in.
    row = int(parts[0][0])
    expected = 0.0
    for part, score in zip(parts, scores, strict=True):
        expected += float(score[part == row].sum())
    assert float(looked_up[0]) == pytest.approx(expected)
