"""Durable storage behind one small interface, with two backends.

- `RedisStore` (production): the event log is a Redis stream, idempotency keys and blobs are plain keys.
  Run Redis with `appendonly yes` and `appendfsync always` so an acknowledged event survives a restart.
- `SqliteStore` (embedded default): one SQLite file in WAL mode with `synchronous=FULL`.

Both services use it for the event log, visitor/item state, the catalog, candidate indexes and
recommendation records. Feast's online store is separate (see `feature_store.py`).
"""

from __future__ import annotations

from services.common.settings import CommonSettings
from services.common.storage.archive import EventArchive
from services.common.storage.base import (
    APPEND_CHUNK,
    CATALOG_VERSION_KEY,
    DEDUPE_TTL_S,
    LOG_NAME,
    UNINDEXED_NAMESPACES,
    AppendResult,
    LogEntry,
    Namespace,
    PendingEvent,
    Store,
    bump_catalog_version,
    catalog_version,
    partition_log,
    partition_of,
    position_order,
    save_catalog,
)
from services.common.storage.redis_store import (
    RedisStore,
    check_redis_durability,
    make_redis_client,
    redis_durability_problems,
)
from services.common.storage.sqlite_store import SqliteStore, connect_sqlite

__all__ = [
    "APPEND_CHUNK",
    "CATALOG_VERSION_KEY",
    "DEDUPE_TTL_S",
    "LOG_NAME",
    "UNINDEXED_NAMESPACES",
    "AppendResult",
    "EventArchive",
    "LogEntry",
    "Namespace",
    "PendingEvent",
    "RedisStore",
    "SqliteStore",
    "Store",
    "bump_catalog_version",
    "catalog_version",
    "check_redis_durability",
    "connect_sqlite",
    "event_dedupe_ttl_s",
    "hot_window_s",
    "make_redis_client",
    "open_store",
    "partition_log",
    "partition_of",
    "position_order",
    "redis_durability_problems",
    "save_catalog",
]


def open_store(settings: CommonSettings) -> Store:
    """Redis when REDIS_URL is set, the embedded SQLite file otherwise; either reads the archived history of
    the log under the offline store, and remembers event ids for the hot window."""
    archive = EventArchive(settings.offline_dir)
    ttl_s = event_dedupe_ttl_s(settings)
    if settings.redis_url:
        client = make_redis_client(settings.redis_url, settings.redis_cluster, settings.redis_timeout_s)
        return RedisStore(client, settings.namespace, settings.log_partitions, archive, ttl_s)
    return SqliteStore(settings.sqlite_path, archive, ttl_s)


def event_dedupe_ttl_s(settings: CommonSettings) -> int:
    """How long an event id is remembered (the log's idempotency keys, and the experiment store's record of
    the outcome events it counted): an event stays in the store for the hot window and, cut at a day boundary
    (archiver.py), up to a day more."""
    return hot_window_s(settings) + (86_400 if settings.hot_window_days >= 1 else 0)


def hot_window_s(settings: CommonSettings) -> int:
    return max(1, int(settings.hot_window_days * 86400))  # whole seconds: the idempotency keys' EX
