"""Changing the number of log partitions (`selaras admin repartition`): moving visitors between partitions.

A visitor's events live in partition `crc32(visitor_id) % N`; with another N most visitors move. Done safely,
with every aggregator stopped, in this order:

1. **Refuse while anything folds or archives**: an announced aggregator process or any partition's lease
   (fold or archive) held by someone else stops the tool with their names. It then holds every lease itself.
2. **Drained**: every partition folded to its end (cursor at the last entry, no commit record pending); the
   CLI folds what is left first (an aggregator of the old count under the tool's leases).
3. **Archive the whole log**: every folded entry goes to the archive, the streams end up empty, so nothing in
   Redis is keyed by the old count any more (readers read the archive).
4. **Move the idempotency keys** of the entries that were still hot to their visitor's new partition (the
   keys live in the partition's hash tag; a re-send keeps being recognised), with their remaining TTL.
5. **Rewrite the archive** under the new count (erasure and export look a visitor up by partition).
6. **Store the new count** (`meta:log_partitions`): processes started with another SELARAS_LOG_PARTITIONS
   refuse to start (`check_log_partitions`). Cursors of partitions that no longer exist are dropped.

Every step can be run again after a failure (the tool checks the state it finds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from services.common.storage.archive import repartition_archive
from services.common.storage.archiver import archive_log
from services.common.storage.base import (
    PARTITIONS_KEY,
    Namespace,
    Store,
    check_log_partitions,
    partition_log,
    partition_of,
    stored_partitions,
)
from services.common.storage.redis_store import RedisStore

log = logging.getLogger(__name__)

TOOL_LEASE_S = 600.0


class RepartitionRefused(Exception):
    """The log cannot be repartitioned now (the message says why and what to do)."""


@dataclass
class RepartitionReport:
    old: int
    new: int
    archived: int = 0
    keys_moved: int = 0
    archive_rows: int = 0


def lease_names(partitions: int) -> list[str]:
    return [name for p in range(partitions) for name in (partition_log(p), f"archive-{partition_log(p)}")]


def take_every_lease(store: Store, holder: str) -> None:
    """Hold every fold and archive lease of the store's partitions, or refuse naming who holds them."""
    members = [key for key, _ in store.scan(Namespace.AGGREGATOR_MEMBERS) if key != holder]
    if members:
        raise RepartitionRefused(
            f"{len(members)} aggregator process(es) are running ({', '.join(sorted(members))}): stop every "
            "aggregator (and set PROFILE_AGGREGATOR_ENABLED=false on the profile API) first"
        )
    busy: dict[str, str] = {}
    for name in lease_names(store.partitions):
        if not store.acquire_lease(name, holder, TOOL_LEASE_S):
            busy[name] = store.lease_holder(name) or "?"
    if busy:
        release_every_lease(store, holder)
        held = ", ".join(f"{name} by {who}" for name, who in sorted(busy.items()))
        raise RepartitionRefused(f"leases are held ({held}): stop every aggregator and archive run first")


def release_every_lease(store: Store, holder: str) -> None:
    for name in lease_names(store.partitions):
        store.release_lease(name, holder)


def undrained(store: Store) -> list[int]:
    """Partitions with entries after their cursor, or a commit record still to apply."""
    left = []
    for partition in range(store.partitions):
        raw = store.get(Namespace.CURSOR, partition_log(partition))
        after = raw.decode() if raw else None
        if store.read_events(after, 1, partition) or store.get(Namespace.COMMIT, partition_log(partition)):
            left.append(partition)
    return left


def repartition(
    old: RedisStore,
    new: RedisStore,
    holder: str,
    drain: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> RepartitionReport:
    """Move the log from `old.partitions` to `new.partitions` (two stores on one Redis namespace); see the module
    docstring. `drain` folds what is left (called with every lease held by `holder`)."""
    say = progress or (lambda _: None)
    if old.archive is None:
        raise RepartitionRefused("the log has no archive (open the store with the offline directory)")
    report = RepartitionReport(old.partitions, new.partitions)
    take_every_lease(old, holder)
    try:
        if drain is not None and undrained(old):
            say("folding what is left of the log")
            drain()
        left = undrained(old)
        if left:
            raise RepartitionRefused(f"partitions {left} are not folded to their end: fold them first")
        say("archiving the hot window")
        hot = [(entry.partition, entry.payload) for entry in old.iter_hot_log()]
        report.archived = archive_log(old, old.archive, old.log_time() + 1.0, 0.0, holder).archived
        if old.log_length():
            raise RepartitionRefused("the log is not empty after archiving it: run the tool again")
        say("moving idempotency keys")
        moves: list[tuple[str, str]] = []
        for from_partition, payload in hot:
            event = orjson.loads(payload).get("event") or {}
            event_id, visitor_id = event.get("event_id"), event.get("visitor_id")
            if not isinstance(event_id, str) or not isinstance(visitor_id, str):
                continue  # a dead letter: nothing to re-recognise
            to_partition = partition_of(visitor_id, new.partitions)
            source, target = old.seen_key(event_id, from_partition), new.seen_key(event_id, to_partition)
            if source != target:
                moves.append((source, target))
        report.keys_moved = new.move_expiring_keys(moves)
        say("rewriting the archive by the new partitions")
        report.archive_rows = repartition_archive(
            old.archive, new.partitions, lambda visitor_id: partition_of(visitor_id, new.partitions)
        )
        for partition in range(new.partitions, old.partitions):
            old.drop_partition_keys(partition)
            old.delete(Namespace.CURSOR, [partition_log(partition)])
            old.delete(Namespace.AGGREGATOR_STATUS, [partition_log(partition)])
        # The streams start empty; the cursors that stay point below every id Redis assigns from now on.
        log.info("repartitioned the log from %d to %d partitions", report.old, report.new)
        new.put(Namespace.META, PARTITIONS_KEY, str(new.partitions).encode())
    finally:
        release_every_lease(old, holder)
    return report


__all__ = ["RepartitionRefused", "check_log_partitions", "repartition", "stored_partitions"]
