"""Shares merged into shared records (what two partitions' aggregators do) equal one consumer folding every
event in time order: item counts exactly, co-visitation and popularity up to rounding."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.events import Event
from services.features.aggregations import ItemState, _prune_buckets, fold_item, merge_item_state
from services.features.indexes import ContextPopularity, CoVisitation
from tests.factories import BASE_TIME, make_event

KINDS = ("product_view", "add_to_cart", "purchase", "impression")


def events_from(draws: list[tuple[int, int, int, int]]) -> list[Event]:
    """(minutes, kind, item, partition-ish visitor) draws, in time order; spans beyond the 30-day window."""
    return [
        make_event(
            event_id=f"m{n}",
            visitor_id=f"v{visitor}",
            type=KINDS[kind],
            item_id=f"i{item}",
            timestamp=(BASE_TIME + timedelta(minutes=minutes)).isoformat(),
            **({"quantity": 2} if KINDS[kind] == "purchase" else {}),
        )
        for n, (minutes, kind, item, visitor) in enumerate(sorted(draws))
    ]


DRAWS = st.lists(
    st.tuples(st.integers(0, 60 * 24 * 45), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(DRAWS, st.integers(1, 7))
def test_item_shares_merged_batch_by_batch_and_partition_by_partition_equal_one_sequential_fold(
    draws: list[tuple[int, int, int, int]], batch: int
) -> None:
    events = events_from(draws)
    sequential: dict[str, ItemState] = {}
    for event in events:
        assert event.item_id
        fold_item(sequential.setdefault(event.item_id, ItemState(event.item_id)), event)

    # Two partitions (by visitor), each folding batches into empty shares, merged in an interleaved order.
    merged: dict[str, ItemState] = {}
    partitions = [[e for e in events if int(e.visitor_id[1:]) % 2 == p] for p in (0, 1)]
    batches = [part[i : i + batch] for part in partitions for i in range(0, len(part), batch)]
    for chunk in sorted(batches, key=lambda c: -len(c)):  # not time order
        shares: dict[str, ItemState] = {}
        for event in chunk:
            assert event.item_id
            fold_item(shares.setdefault(event.item_id, ItemState(event.item_id)), event)
        for item_id, share in shares.items():
            merged[item_id] = merge_item_state(merged.get(item_id), share)
    assert {i: s.buckets for i, s in merged.items()} == {i: s.buckets for i, s in sequential.items()}
    assert {i: s.last_ts for i, s in merged.items()} == {i: s.last_ts for i, s in sequential.items()}


def test_index_shares_merged_equal_one_fold_up_to_rounding() -> None:
    events = events_from([(m * 13, m % 4, m % 3, m % 5) for m in range(40)])
    whole_covis, whole_pop = CoVisitation(), ContextPopularity()
    for n, event in enumerate(events):
        assert event.item_id
        previous = [e.item_id for e in reversed(events[max(0, n - 3) : n]) if e.item_id]
        whole_covis.observe(previous, event.item_id)
        whole_pop.observe(["all"], event.item_id, 1.0, event.ts)

    stored_covis: dict[str, bytes] = {}
    stored_pop: bytes | None = None
    for start in (20, 0):  # the later half first: shares arrive out of time order
        covis, pop = CoVisitation(), ContextPopularity()
        for n in range(start, start + 20):
            event = events[n]
            assert event.item_id
            previous = [e.item_id for e in reversed(events[max(0, n - 3) : n]) if e.item_id]
            covis.observe(previous, event.item_id)
            pop.observe(["all"], event.item_id, 1.0, event.ts)
        for item_id in covis.dirty:
            stored_covis[item_id] = CoVisitation.merge(stored_covis.get(item_id), covis.neighbours[item_id])
        stored_pop = ContextPopularity.merge(stored_pop, pop.scores["all"])

    for item_id, raw in stored_covis.items():
        assert dict(orjson.loads(raw)) == pytest.approx(dict(whole_covis.top(item_id, 60)), rel=1e-9)
    assert stored_pop is not None
    merged_pop = orjson.loads(stored_pop)
    assert set(merged_pop) == set(whole_pop.scores["all"])
    for item_id, (score, ts) in merged_pop.items():
        assert (score, ts) == pytest.approx(tuple(whole_pop.scores["all"][item_id]), rel=1e-9)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60 * 24 * 75), st.integers(0, 3)), min_size=1, max_size=60))
def test_item_fold_prunes_as_if_after_every_event(draws: list[tuple[int, int]]) -> None:
    """`fold_item` scans the buckets only when the newest hour moves or an event is already outside the window;
    the buckets equal pruning after every event, for events in any order (late ones included)."""
    events = [
        make_event(
            event_id=f"p{n}",
            type=KINDS[kind],
            item_id="i",
            timestamp=(BASE_TIME + timedelta(minutes=minutes)).isoformat(),
        )
        for n, (minutes, kind) in enumerate(draws)  # not sorted: late events too
    ]
    folded, reference = ItemState("i"), ItemState("i")
    for event in events:
        fold_item(folded, event)
        fold_item(reference, event)
        newest = int(reference.last_ts // 3600)
        _prune_buckets(reference.buckets, newest)
        for per_slot in reference.slot_buckets.values():
            _prune_buckets(per_slot, newest)
        assert folded.buckets == reference.buckets
    assert folded.last_ts == reference.last_ts
    assert sum(sum(hours.values()) for hours in folded.buckets.values()) <= len(events) * 2
