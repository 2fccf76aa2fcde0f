"""Exactly-once folding on real Redis + Feast: a batch folded again, or a write that fails midway and is
retried (by the same aggregator or by a fresh one after a crash), leaves item statistics, visitor states,
candidate indexes and offline history rows equal to the logged events, exactly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from services.common.clock import FixedClock
from services.common.errors import StorageUnavailable
from services.common.events import Event
from services.common.storage import Namespace, partition_log
from services.features import schema as F
from services.features.aggregations import ItemState, SegmentRules, fold_item
from services.profile.aggregator.commit import BatchCommit
from services.profile.aggregator.worker import Aggregator
from services.profile.app import ProfileState, build_state
from services.profile.settings import ProfileSettings
from tests.factories import BASE_TIME, make_shop_events

CLOCK = FixedClock(BASE_TIME + timedelta(days=1))
BATCH = 40


def shop_events() -> list[Event]:
    """Views, carts and purchases (quantity 2) of 6 visitors over 5 items, in time order."""
    return make_shop_events("eo", "eo-visitor", "eo-item", visitors=6, count=150)


def aggregator_for(state: ProfileState) -> Aggregator:
    """A fresh aggregator on the same storage (what a restarted process builds)."""
    return Aggregator(state.repository, SegmentRules(), state.consent_defaults, clock=CLOCK)


def fold_all(aggregator: Aggregator) -> None:
    while aggregator.run_once(BATCH).events:
        pass


def expected_items(events: list[Event]) -> dict[str, dict[str, dict[str, int]]]:
    states: dict[str, ItemState] = {}
    for event in events:
        assert event.item_id
        fold_item(states.setdefault(event.item_id, ItemState(event.item_id)), event)
    return {item_id: s.buckets for item_id, s in states.items()}


def stored(state: ProfileState) -> dict[str, Any]:
    """What the fold left in storage: item buckets, visitor event counts, index blobs, offline rows."""
    repository = state.repository
    items = {s.item_id: s.buckets for s in repository.all_item_states()}
    visitors = {
        vid: s.event_count for vid, s in repository.visitor_states([f"eo-visitor-{i}" for i in range(6)]).items()
    }
    # Parsed: shares merged in another grouping (batches of other partitions in between) add the same floats
    # in another order, equal up to rounding.
    indexes = {
        (namespace, key, item, n): value
        for namespace in (Namespace.COVISITATION, Namespace.POPULARITY)
        for key, raw in repository.store.scan(namespace)
        for item, values in _flat(orjson.loads(raw)).items()
        for n, value in enumerate(values if isinstance(values, list) else [values])
    }
    offline = Counter[str]()
    for path in (state.settings.offline_dir / F.VISITOR_VIEW).glob("*.parquet"):
        offline.update(pq.read_table(path, columns=[F.VISITOR_KEY]).column(F.VISITOR_KEY).to_pylist())
    return {"items": items, "visitors": visitors, "indexes": indexes, "offline": dict(offline)}


def _flat(entry: Any) -> dict[str, Any]:
    """A co-visitation row ([[item, weight], ...]) or a popularity row ({item: [score, ts]}) as a dict."""
    return dict(entry) if isinstance(entry, list) else entry


def assert_exact(state: ProfileState, events: list[Event], reference: dict[str, Any] | None = None) -> None:
    found = stored(state)
    per_visitor = dict(Counter(e.visitor_id for e in events))
    assert found["items"] == expected_items(events), "item statistics differ from the logged events"
    assert found["visitors"] == per_visitor, "visitor event counts differ from the logged events"
    assert found["offline"] == per_visitor, "offline history rows differ from the logged events"
    assert all(state.repository.commit_record(partition_log(p)) is None for p in range(state.repository.partitions))
    if reference is not None:
        assert found["indexes"] == pytest.approx(reference["indexes"], rel=1e-9), (
            "candidate indexes differ from a run without faults"
        )


@pytest.fixture
def make_state(settings_factory: Callable[..., Any], tmp_path: Path) -> Callable[[str], ProfileState]:
    """Profile parts on their own namespace, Feast project and data directory."""

    def make(name: str) -> ProfileState:
        settings: ProfileSettings = settings_factory(ProfileSettings, data_dir=tmp_path / name, offline_rows=True)
        return build_state(settings, clock=CLOCK)

    return make


@pytest.fixture
def reference(make_state: Callable[[str], ProfileState]) -> dict[str, Any]:
    """The same events folded without any fault."""
    state = make_state("reference")
    try:
        state.ingest.ingest(shop_events())
        fold_all(aggregator_for(state))
        result = stored(state)
    finally:
        state.repository.close()
    return result


def test_a_batch_folded_again_from_an_old_cursor_counts_nothing_twice(
    make_state: Callable[[str], ProfileState], reference: dict[str, Any]
) -> None:
    state = make_state("faulty")
    try:
        events = shop_events()
        state.ingest.ingest(events)
        fold_all(aggregator_for(state))
        assert_exact(state, events, reference)
        # The cursor is lost (set back to the start): every batch is read and folded a second time.
        logs = [partition_log(p) for p in range(state.repository.partitions)]
        state.repository.store.delete(Namespace.CURSOR, logs)
        fold_all(aggregator_for(state))
        assert_exact(state, events, reference)
    finally:
        state.repository.close()


class Fault:
    """Makes the `nth` matching call of `owner.name` raise StorageUnavailable, once."""

    def __init__(
        self,
        owner: Any,
        name: str,
        nth: int,
        when: Callable[..., bool] = lambda *a, **k: True,
        after: bool = False,  # raise after the call did its work (a lost answer)
    ):
        self.after = after
        self.original = getattr(owner, name)
        self.calls = 0
        self.fired = False
        self.when = when
        self.nth = nth
        setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fired and self.when(*args, **kwargs):
            self.calls += 1
            if self.calls == self.nth:
                self.fired = True
                if self.after:
                    self.original(*args, **kwargs)
                raise StorageUnavailable("injected fault")
        return self.original(*args, **kwargs)


def in_namespace(namespace: str) -> Callable[..., bool]:
    return lambda ns, *args, **kwargs: ns == namespace


# Each point of a batch's writes, in order: feature rows, the commit record, its application (visitor
# states, item states, indexes), the cursor, the record's removal.
FAULTS: dict[str, Callable[[ProfileState], Fault]] = {
    "item rows": lambda s: Fault(s.repository, "write_item_rows", 2),
    "commit record": lambda s: Fault(s.repository, "save_commit_record", 2),
    "item states": lambda s: Fault(s.repository.store, "merge_many", 2, in_namespace(Namespace.ITEM_STATE)),
    "indexes": lambda s: Fault(s.repository.store, "merge_many", 2, in_namespace(Namespace.POPULARITY)),
    # The shares were added but the answer was lost: applying the record again must add nothing.
    "item states written": lambda s: Fault(
        s.repository.store, "merge_many", 2, in_namespace(Namespace.ITEM_STATE), after=True
    ),
    "cursor": lambda s: Fault(s.repository, "set_cursor", 2),
    "record removal": lambda s: Fault(s.repository, "delete_commit_record", 2),
}


@pytest.mark.parametrize("restart", [False, True], ids=["retried", "restarted"])
@pytest.mark.parametrize("point", list(FAULTS))
def test_a_write_failing_midway_then_retried_leaves_exact_totals(
    point: str, restart: bool, make_state: Callable[[str], ProfileState], reference: dict[str, Any]
) -> None:
    state = make_state("faulty")
    try:
        events = shop_events()
        state.ingest.ingest(events)
        fault = FAULTS[point](state)
        aggregator = aggregator_for(state)
        with pytest.raises(StorageUnavailable):
            fold_all(aggregator)
        assert fault.fired
        if restart:  # the process died: a new one starts from what is stored
            aggregator = aggregator_for(state)
        fold_all(aggregator)
        assert_exact(state, events, reference)
    finally:
        state.repository.close()


def test_an_erasure_while_another_process_holds_a_commit_record_is_not_undone_by_it(
    make_state: Callable[[str], ProfileState],
) -> None:
    """An aggregator process stores a batch's commit record and dies before applying it; the API process
    (its own objects: no fold lock in common) erases one of the batch's visitors; the next aggregator applies
    the record. The erased visitor's state and online row stay gone, the others' are written."""
    state = make_state("erasure")
    try:
        events = shop_events()
        state.ingest.ingest(events)
        erased = "eo-visitor-2"
        partition = state.repository.store.partition_of(erased)
        # Applying the record of the visitor's batch fails (the process dies there): the record stays.
        fault = Fault(
            state.repository.store,
            "put_many",
            1,
            lambda ns, values, *a, **k: ns == Namespace.VISITOR_STATE and erased in values,
        )
        with pytest.raises(StorageUnavailable):
            fold_all(aggregator_for(state))
        assert fault.fired
        record = BatchCommit.from_bytes(state.repository.commit_record(partition_log(partition)) or b"")
        assert erased in record.values(Namespace.VISITOR_STATE)

        receipt = state.privacy.erase(erased)  # the API process, while the record is pending
        assert receipt.log_events == sum(e.visitor_id == erased for e in events)

        fold_all(aggregator_for(state))  # applies the pending records, folds the rest
        assert state.repository.visitor_states([erased]) == {}, "the commit record wrote the erased state back"
        assert state.repository.online_visitor(erased).get("event_count") is None
        kept = {e.visitor_id for e in events} - {erased}
        folded = state.repository.visitor_states(sorted(kept))
        assert {v: s.event_count for v, s in folded.items()} == dict(
            Counter(e.visitor_id for e in events if e.visitor_id != erased)
        )
    finally:
        state.repository.close()


def test_a_round_merges_the_shared_records_once_for_all_its_partitions(
    make_state: Callable[[str], ProfileState], reference: dict[str, Any]
) -> None:
    """One process folding several partitions reads, changes and writes each item and index record once per
    round (every partition's share added, each under its log's marker), not once per partition; the totals are
    those of the logged events."""
    state = make_state("rounds")
    try:
        events = shop_events()
        state.ingest.ingest(events)
        store = state.repository.store
        partitions = {store.partition_of(e.visitor_id) for e in events}
        assert len(partitions) >= 2  # the round has several batches
        calls: Counter[str] = Counter()
        merge_many = store.merge_many

        def counted(namespace: str, keys: Any, change: Any) -> Any:
            calls[namespace] += 1
            return merge_many(namespace, keys, change)

        store.merge_many = counted  # type: ignore[method-assign]
        aggregator = aggregator_for(state)
        rounds = 0
        while aggregator.run_once(BATCH).events:
            rounds += 1
        assert calls[Namespace.ITEM_STATE] == calls[Namespace.POPULARITY] == rounds
        assert rounds < len(events) / BATCH  # fewer rounds than batches: each round held several
        assert_exact(state, events, reference)
        markers = store.client.get(store._marker_key(Namespace.ITEM_STATE, "eo-item-0"))  # type: ignore[attr-defined]
        assert set(orjson.loads(markers)) == {partition_log(p) for p in partitions}
    finally:
        state.repository.close()
