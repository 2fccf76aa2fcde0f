"""Which items' statistics changed, in time buckets, so item caches re-read only those rows.

The recommend service keeps every product's statistics in memory and refreshes them every few seconds. Reading
all rows through the online store costs O(catalog): 5.6 s of CPU per refresh for a 100,000-item catalog, in
every worker, every 10 s, which left no CPU for requests. The aggregator (the single writer of item rows)
therefore records the ids it touched per 5-second bucket, and a refresh reads only the ids of the buckets
since its previous one; a full read remains for start-up and for gaps longer than the buckets are kept.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from services.common.storage import Namespace, Store

BUCKET_S = 5
KEEP_S = 3600
# Buckets re-read before `since`: covers clock skew between hosts and a batch written at a bucket's edge.
MARGIN_BUCKETS = 2


def _key(bucket: int) -> str:
    return str(bucket)


class ItemChangeRecorder:
    """Single writer (the aggregator): the current bucket's ids are kept in memory and stored whole."""

    def __init__(self, store: Store):
        self.store = store
        self._bucket: int | None = None
        self._items: set[str] = set()

    def record(self, item_ids: Iterable[str], now: float) -> None:
        ids = set(item_ids)
        if not ids:
            return
        bucket = int(now // BUCKET_S)
        if bucket != self._bucket:
            self._bucket = bucket
            # A restarted writer keeps what an earlier process already stored in this bucket.
            stored = self.store.get(Namespace.ITEM_CHANGES, _key(bucket))
            self._items = set(orjson.loads(stored)) if stored else set()
        self._items |= ids
        self.store.put(Namespace.ITEM_CHANGES, _key(bucket), orjson.dumps(sorted(self._items)), ttl_s=KEEP_S)


def changed_items(store: Store, since: float, until: float) -> set[str] | None:
    """Ids of items whose rows changed between `since` and `until`; None when part of that span is no longer
    kept (the caller then reads every row)."""
    first = int(since // BUCKET_S) - MARGIN_BUCKETS
    last = int(until // BUCKET_S)
    if (last - first) * BUCKET_S >= KEEP_S - BUCKET_S:
        return None
    changed: set[str] = set()
    for raw in store.get_many(Namespace.ITEM_CHANGES, [_key(b) for b in range(first, last + 1)]):
        if raw:
            changed.update(orjson.loads(raw))
    return changed
