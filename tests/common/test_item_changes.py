"""Item change buckets: what the aggregator touched is what an item cache re-reads (Redis and SQLite)."""

from __future__ import annotations

from services.common.item_changes import BUCKET_S, KEEP_S, ItemChangeRecorder, changed_items
from services.common.storage import Store
from tests.common.test_storage import store  # noqa: F401  (the Redis/SQLite store fixture)

T0 = 1_800_000_000.0


def test_changes_since_a_time_are_the_ids_recorded_after_it(store: Store) -> None:  # noqa: F811
    recorder = ItemChangeRecorder(store)
    recorder.record(["a", "b"], T0)
    recorder.record(["c"], T0 + 1)  # same bucket: merged
    recorder.record(["d"], T0 + 10 * BUCKET_S)
    assert changed_items(store, T0, T0 + 1) == {"a", "b", "c"}
    assert changed_items(store, T0 + 10 * BUCKET_S, T0 + 11 * BUCKET_S) == {"d"}
    assert changed_items(store, T0 + 20 * BUCKET_S, T0 + 21 * BUCKET_S) == set()
    # The margin before `since` re-reads the previous buckets (clock skew, a batch at a bucket's edge).
    assert changed_items(store, T0 + BUCKET_S, T0 + 2 * BUCKET_S) == {"a", "b", "c"}


def test_a_restarted_writer_keeps_what_the_bucket_already_had(store: Store) -> None:  # noqa: F811
    ItemChangeRecorder(store).record(["a"], T0)
    ItemChangeRecorder(store).record(["b"], T0 + 1)
    assert changed_items(store, T0, T0 + 1) == {"a", "b"}


def test_a_span_longer_than_what_is_kept_asks_for_a_full_read(store: Store) -> None:  # noqa: F811
    ItemChangeRecorder(store).record(["a"], T0)
    assert changed_items(store, T0 - KEEP_S, T0) is None
    assert changed_items(store, T0 - KEEP_S / 2, T0) == {"a"}
