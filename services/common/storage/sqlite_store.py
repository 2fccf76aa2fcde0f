"""The embedded backend: one SQLite file in WAL mode with `synchronous=FULL` (one log partition)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from services.common.clock import wall_time
from services.common.errors import StorageUnavailable
from services.common.storage.archive import EventArchive
from services.common.storage.base import (
    DEDUPE_TTL_S,
    UNINDEXED_NAMESPACES,
    AppendResult,
    LogEntry,
    MergeChange,
    PendingEvent,
    Store,
    require_new_marker,
    require_unindexed,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    visitor_id TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_visitor ON events (visitor_id);
CREATE TABLE IF NOT EXISTS seen_ids (event_id TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires_at REAL,
    PRIMARY KEY (ns, key)
);
CREATE TABLE IF NOT EXISTS members (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (ns, key, member)
);
"""


def connect_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """A durable SQLite connection: WAL (readers never block the writer; both services share the file),
    `synchronous=FULL` (a committed write survives power loss), explicit transactions, the schema applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(schema)
    return conn


class SqliteStore(Store):
    backend = "sqlite"

    def __init__(self, path: Path, archive: EventArchive | None = None, dedupe_ttl_s: int = DEDUPE_TTL_S):
        self.path = path
        self.archive = archive
        self.dedupe_ttl_s = dedupe_ttl_s
        # One connection guarded by a lock: SQLite serialises writers anyway, and this keeps it simple.
        self._conn = connect_sqlite(path, _SCHEMA)
        self._lock = threading.Lock()

    def _run(self, fn: Any) -> Any:
        try:
            with self._lock:
                return fn(self._conn)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"store unavailable: {type(exc).__name__}") from exc

    def append_events(self, events: Sequence[PendingEvent]) -> AppendResult:
        now = wall_time()

        def write(conn: sqlite3.Connection) -> tuple[str, ...]:
            conn.execute("BEGIN IMMEDIATE")  # the write lock makes check-then-insert atomic
            try:
                ids = list(dict.fromkeys(e.event_id for e in events))
                seen: set[str] = set()
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    seen.update(
                        row[0]
                        for row in conn.execute(
                            f"SELECT event_id FROM seen_ids WHERE event_id IN ({marks}) AND expires_at > ?",
                            (*chunk, now),
                        )
                    )
                fresh: list[PendingEvent] = []
                for event in events:
                    if event.event_id not in seen:
                        seen.add(event.event_id)
                        fresh.append(event)
                conn.executemany(  # an expired id seen again is new again (as in Redis)
                    "INSERT OR REPLACE INTO seen_ids (event_id, expires_at) VALUES (?, ?)",
                    [(e.event_id, now + self.dedupe_ttl_s) for e in fresh],
                )
                conn.executemany(
                    "INSERT INTO events (event_id, visitor_id, payload) VALUES (?, ?, ?)",
                    [(e.event_id, e.visitor_id, e.payload) for e in fresh],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return tuple(e.event_id for e in fresh)

        ids = cast(tuple[str, ...], self._run(write))
        return AppendResult(len(ids), len(events) - len(ids), ids)

    def read_events(self, after: str | None, limit: int, partition: int = 0) -> list[LogEntry]:
        _one_partition(partition)
        rows = self._run(
            lambda c: c.execute(
                "SELECT pos, payload FROM events WHERE pos > ? ORDER BY pos LIMIT ?", (int(after or 0), limit)
            ).fetchall()
        )
        return [LogEntry(str(pos), bytes(payload)) for pos, payload in rows]

    def log_length(self, partition: int | None = None) -> int:
        _one_partition(partition or 0)
        return int(self._run(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone()[0]))

    def trim_log(self, partition: int, last: str) -> int:
        """Also forgets the event ids whose idempotency expired (Redis expires its keys by itself)."""
        _one_partition(partition)
        now = wall_time()

        def trim(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                count = conn.execute("DELETE FROM events WHERE pos <= ?", (int(last),)).rowcount
                conn.execute("DELETE FROM seen_ids WHERE expires_at <= ?", (now,))
                conn.execute("DELETE FROM members WHERE expires_at <= ?", (now,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return int(count)

        return int(self._run(trim))

    def delete_events(self, positions: Sequence[str], partition: int = 0) -> int:
        _one_partition(partition)
        rows = [(int(p),) for p in positions]
        return int(self._run(lambda c: self._transaction(c, "DELETE FROM events WHERE pos = ?", rows)))

    def delete_visitor_events(self, visitor_id: str, payload_marker: bytes) -> int:
        return int(self._run(lambda c: c.execute("DELETE FROM events WHERE visitor_id = ?", (visitor_id,)).rowcount))

    def forget_event_ids(self, event_ids: Sequence[str], visitor_id: str) -> None:
        self._run(lambda c: self._transaction(c, "DELETE FROM seen_ids WHERE event_id = ?", [(i,) for i in event_ids]))

    def get_many(self, namespace: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        now = wall_time()
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._run(
                lambda c, chunk=chunk, marks=marks: c.execute(
                    f"SELECT key, value FROM blobs WHERE ns = ? AND key IN ({marks})"
                    " AND (expires_at IS NULL OR expires_at > ?)",
                    (namespace, *chunk, now),
                ).fetchall()
            )
            found.update((key, bytes(value)) for key, value in rows)
        return [found.get(k) for k in keys]

    def put_many(self, namespace: str, values: Mapping[str, bytes], ttl_s: int | None = None) -> None:
        expires = wall_time() + ttl_s if ttl_s else None
        rows = [(namespace, key, value, expires) for key, value in values.items()]
        self._run(
            lambda c: self._transaction(
                c,
                "INSERT INTO blobs (ns, key, value, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                rows,
            )
        )

    def update(
        self, namespace: str, key: str, change: Callable[[bytes | None], bytes], ttl_s: int | None = None
    ) -> bytes:
        def write(conn: sqlite3.Connection) -> bytes:
            conn.execute("BEGIN IMMEDIATE")  # the write lock across processes: read, change and write as one
            try:
                row = conn.execute(
                    "SELECT value FROM blobs WHERE ns = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
                    (namespace, key, wall_time()),
                ).fetchone()
                value = change(bytes(row[0]) if row else None)
                conn.execute(
                    "INSERT INTO blobs (ns, key, value, expires_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                    (namespace, key, value, None if ttl_s is None else wall_time() + ttl_s),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return value

        return cast(bytes, self._run(write))

    def merge_many(self, namespace: str, keys: Sequence[str], change: MergeChange) -> dict[str, bytes | None]:
        marker_ns = f"{namespace}@applied"  # markers as rows of their own namespace, in the same transaction
        now = wall_time()

        def read(conn: sqlite3.Connection, ns: str, key: str) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM blobs WHERE ns = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
                (ns, key, now),
            ).fetchone()
            return bytes(row[0]) if row else None

        def write(conn: sqlite3.Connection) -> dict[str, bytes | None]:
            conn.execute("BEGIN IMMEDIATE")  # the write lock across processes: read, change and write as one
            try:
                stored: dict[str, bytes | None] = {}
                for key in dict.fromkeys(keys):
                    value = read(conn, namespace, key)
                    marker = read(conn, marker_ns, key)
                    new = change(key, value, marker)
                    if new is None:
                        stored[key] = value
                        continue
                    require_new_marker(key, marker, new)
                    conn.executemany(
                        "INSERT INTO blobs (ns, key, value, expires_at) VALUES (?, ?, ?, NULL)"
                        " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires_at = NULL",
                        [(namespace, key, new[0]), (marker_ns, key, new[1])],
                    )
                    stored[key] = new[0]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return stored

        return cast(dict[str, bytes | None], self._run(write))

    @staticmethod
    def _transaction(conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
        """One transaction (one fsync) for many rows: autocommit would sync every row."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = conn.executemany(sql, rows).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(count)

    def delete(self, namespace: str, keys: Sequence[str]) -> int:
        def remove(conn: sqlite3.Connection) -> int:
            markers = [(f"{namespace}@applied", k) for k in keys]  # of merged records (see `merge_many`)
            conn.executemany("DELETE FROM blobs WHERE ns = ? AND key = ?", markers)
            if namespace in UNINDEXED_NAMESPACES:  # may hold member sets (`add_members`): one per key deleted
                sets = sum(
                    conn.execute("DELETE FROM members WHERE ns = ? AND key = ?", (namespace, k)).rowcount > 0
                    for k in dict.fromkeys(keys)
                )
                if sets:
                    return sets
            return int(
                conn.executemany("DELETE FROM blobs WHERE ns = ? AND key = ?", [(namespace, k) for k in keys]).rowcount
            )

        return int(self._run(remove))

    def scan(self, namespace: str) -> Iterator[tuple[str, bytes]]:
        now = wall_time()
        rows = self._run(
            lambda c: c.execute(
                "SELECT key, value FROM blobs WHERE ns = ? AND (expires_at IS NULL OR expires_at > ?)",
                (namespace, now),
            ).fetchall()
        )
        for key, value in rows:
            yield key, bytes(value)

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = wall_time()  # lease expiry is infrastructure time, like Redis's PX

        def take(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")  # the write lock makes check-then-set atomic across processes
            try:
                row = conn.execute("SELECT holder, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
                free = row is None or row[0] == holder or row[1] <= now
                if free:
                    conn.execute(
                        "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) ON CONFLICT (name)"
                        " DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                        (name, holder, now + ttl_s),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return free

        return bool(self._run(take))

    def add_members(self, namespace: str, members: Mapping[str, Iterable[str]], ttl_s: int) -> None:
        require_unindexed(namespace)
        expires = wall_time() + ttl_s
        rows = [(namespace, key, member, expires) for key, values in members.items() for member in values]
        if rows:
            self._run(
                lambda c: self._transaction(
                    c,
                    "INSERT INTO members (ns, key, member, expires_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (ns, key, member) DO UPDATE SET expires_at = excluded.expires_at",
                    rows,
                )
            )

    def members(self, namespace: str, key: str) -> set[str]:
        rows = self._run(
            lambda c: c.execute(
                "SELECT member FROM members WHERE ns = ? AND key = ? AND expires_at > ?", (namespace, key, wall_time())
            ).fetchall()
        )
        return {str(row[0]) for row in rows}

    def release_lease(self, name: str, holder: str) -> None:
        self._run(lambda c: c.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)))

    def lease_holder(self, name: str) -> str | None:
        row = self._run(
            lambda c: c.execute(
                "SELECT holder FROM leases WHERE name = ? AND expires_at > ?", (name, wall_time())
            ).fetchone()
        )
        return str(row[0]) if row else None

    def count(self, namespace: str) -> int:
        now = wall_time()
        sql = "SELECT COUNT(*) FROM blobs WHERE ns = ? AND (expires_at IS NULL OR expires_at > ?)"
        return int(self._run(lambda c: c.execute(sql, (namespace, now)).fetchone()[0]))

    def ping(self) -> bool:
        try:
            self._run(lambda c: c.execute("SELECT 1").fetchone())
            return True
        except StorageUnavailable:
            return False

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _one_partition(partition: int) -> None:
    """The embedded store keeps one log: one process folds it (SQLite serialises its writers anyway)."""
    if partition != 0:
        raise ValueError(f"the embedded store has one log partition, not {partition + 1}")
