"""The ranking pipeline of one slot (services/recommend/ranking/pipeline.py), as a unit: a small snapshot, no
store, no HTTP. The end-to-end tests cover the same code through the API; these pin its rules one by one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from services.experiments.config import ArmChoice
from services.features.indexes import GLOBAL_CONTEXT
from services.features.item_cache import ItemSnapshot, build_snapshot
from services.recommend.ranking.candidates import CandidateGenerator, VisitorVector
from services.recommend.ranking.exploration import Exploration
from services.recommend.ranking.pipeline import PipelineOptions, RankContext, SlotPipeline
from services.recommend.ranking.rules import RuleContext
from services.recommend.schemas import SlotRequest
from tests.factories import BASE_TIME, make_item

NOW = BASE_TIME.timestamp()


def snapshot_of(n: int = 12) -> ItemSnapshot:
    # Categories alternate so a category quota has something to do; item i is viewed i times (popularity).
    items = [
        make_item(item_id=f"i{k}", category="shoes" if k % 2 else "bags", tags=[f"t{k % 3}", "common"])
        for k in range(n)
    ]
    stats = {f"i{k}": {"views_7d": float(k)} for k in range(n)}
    popularity = {GLOBAL_CONTEXT: {f"i{k}": [float(k), NOW] for k in range(n)}}  # [score, last update]
    return build_snapshot(items, stats, {}, popularity, now=NOW)


def pipeline(exploration: dict[str, Exploration] | None = None, seed: int = 7) -> SlotPipeline:
    options = PipelineOptions(exploration=exploration or {}, max_per_category=None, max_pinned_per_slot=1)
    return SlotPipeline(CandidateGenerator(50), options, exploration_seed=seed)


def context(snapshot: ItemSnapshot, anchors: Sequence[str] = (), locale: Any = "en") -> RankContext:
    return RankContext(
        snapshot=snapshot,
        model=None,
        visitor=VisitorVector.from_row("v-1", None),
        context={},
        keys=[GLOBAL_CONTEXT],
        rules=RuleContext(hour=12, device=None, city=None, is_payday_window=False),
        now=NOW,
        explain=True,
        anchors=tuple(snapshot.index[a] for a in anchors),
        locale=locale,
    )


def ids(snapshot: ItemSnapshot, rows: Sequence[int]) -> list[str]:
    return [snapshot.ids[i] for i in rows]


def test_a_rerank_slot_keeps_the_shops_order_counts_unknown_ids_and_applies_filters() -> None:
    snapshot = snapshot_of()
    slot = SlotRequest.model_validate(
        {
            "name": "search",
            "strategy": "rerank",
            "count": 10,
            "candidate_ids": ["i3", "nope", "i1", "i3", "i5", "i8"],
            "filters": {"exclude_items": ["i5"]},
        }
    )
    ranked = pipeline().rank_slot(slot, context(snapshot), shown=set())
    assert ids(snapshot, ranked.idx) == ["i3", "i1", "i8"]  # duplicates once, unknown and excluded dropped
    assert ranked.unknown == 1
    assert ranked.propensities == [1.0, 1.0, 1.0]  # no exploration configured
    assert ranked.reasons is not None and len(ranked.reasons) == 3


def test_without_a_model_a_personal_slot_ranks_by_popularity_and_skips_what_other_slots_showed() -> None:
    snapshot = snapshot_of()
    slot = SlotRequest.model_validate({"name": "home", "count": 4, "max_per_category": 4})
    first = pipeline().rank_slot(slot, context(snapshot), shown=set())
    assert ids(snapshot, first.idx) == ["i11", "i10", "i9", "i8"]
    assert first.scores == sorted(first.scores, reverse=True)
    second = pipeline().rank_slot(slot, context(snapshot), shown={"i11", "i10"})
    assert ids(snapshot, second.idx) == ["i9", "i8", "i7", "i6"]


def test_the_category_quota_limits_a_personal_slot() -> None:
    snapshot = snapshot_of()
    slot = SlotRequest.model_validate({"name": "home", "count": 6, "max_per_category": 1})
    ranked = pipeline().rank_slot(slot, context(snapshot), shown=set())
    assert ids(snapshot, ranked.idx) == ["i11", "i10"]  # one shoe, one bag


def test_a_similar_slot_never_returns_its_anchor_and_names_it_in_the_reason() -> None:
    snapshot = snapshot_of()
    slot = SlotRequest.model_validate({"name": "pdp", "strategy": "similar", "count": 3})
    ranked = pipeline().rank_slot(slot, context(snapshot, anchors=["i4"], locale="id"), shown=set())
    assert ranked.idx and "i4" not in ids(snapshot, ranked.idx)
    anchor_title = snapshot.titles[snapshot.index["i4"]]
    assert ranked.reasons is not None
    assert all(anchor_title in reasons[0] for reasons in ranked.reasons)


@pytest.mark.parametrize("mode", ["epsilon_greedy", "softmax"])
def test_exploration_logs_propensities_ranks_and_pool_and_is_reproducible_with_a_seed(mode: str) -> None:
    snapshot = snapshot_of()
    explore = {"home": Exploration(mode=mode, epsilon=0.5, temperature=0.5)}
    slot = SlotRequest.model_validate({"name": "home", "count": 3, "max_per_category": 6})
    runs = [pipeline(explore, seed=11).rank_slot(slot, context(snapshot), shown=set()) for _ in range(2)]
    assert runs[0].idx == runs[1].idx and runs[0].propensities == runs[1].propensities
    ranked = runs[0]
    assert ranked.pool == 12 and ranked.ranks is not None and len(ranked.ranks) == 3
    assert all(0.0 < p <= 1.0 for p in ranked.propensities)
    # Over many draws every eligible item gets shown somewhere: exploration really explores.
    seen: set[int] = set()
    explorer = pipeline(explore, seed=3)
    for _ in range(300):
        seen.update(explorer.rank_slot(slot, context(snapshot), shown=set()).idx)
    assert len(seen) == 12
    assert np.isfinite(ranked.scores).all()


def test_an_experiment_arm_ranks_with_its_own_generators_and_category_quota() -> None:
    snapshot = snapshot_of()
    slot = SlotRequest.model_validate({"name": "home", "count": 6})
    plain = pipeline().rank_slot(slot, context(snapshot), shown=set())
    assert len(plain.idx) == 6
    ranked = pipeline()
    quota = ArmChoice("exp", "one-per-category", True, max_per_category=1)
    assert len(ranked.rank_slot(slot, replace(context(snapshot), experiment=quota), shown=set()).idx) == 2
    # An arm that may only use new arrivals finds none here (every item is a month old): its own generators.
    fresh_only = ArmChoice("exp", "new-only", True, candidate_sources=("new_arrival",))
    assert ranked.rank_slot(slot, replace(context(snapshot), experiment=fresh_only), shown=set()).idx == []
    assert ranked.generator_of(fresh_only).sources == frozenset({"new_arrival"})
    assert ranked.generator_of(fresh_only) is ranked.generator_of(fresh_only)  # built once
    # A name the service does not know (a hand-edited file) serves with the service's generators, no error.
    unknown = ArmChoice("exp", "typo", True, candidate_sources=("nope",))
    assert ranked.generator_of(unknown) is ranked.generator
