"""The experiment store in the embedded SQLite file: the same algorithm as the Lua scripts of
redis_store.py, inside one `BEGIN IMMEDIATE` transaction."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from services.common.clock import wall_time
from services.common.errors import StorageUnavailable
from services.common.storage import DEDUPE_TTL_S, connect_sqlite
from services.experiments.store.base import (
    VISITOR_TTL_S,
    Applied,
    ErasedVisitor,
    ExperimentStore,
    ExposureWrite,
    OutcomeWrite,
    Reindexed,
    VisitorHead,
    check_record,
    clean_label,
    covariate_args,
    day_of,
    denominator_args,
    record_visitor,
    value_args,
)
from services.experiments.store.sums import ALL, METRICS, histogram_increments

# ------------------------------------------------------------------------------------------------
# SQLite (embedded mode): the same algorithm as the Lua scripts, inside one transaction.
# ------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exp_sums (exp TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (exp, name));
CREATE TABLE IF NOT EXISTS exp_days (exp TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (exp, name));
CREATE TABLE IF NOT EXISTS exp_visitors (exp TEXT NOT NULL, visitor_id TEXT NOT NULL, data TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (exp, visitor_id));
CREATE TABLE IF NOT EXISTS exp_records (exp TEXT NOT NULL, rec_id TEXT NOT NULL, data TEXT NOT NULL,
    expires_at REAL NOT NULL, visitor_id TEXT, PRIMARY KEY (exp, rec_id));
CREATE TABLE IF NOT EXISTS exp_seen (exp TEXT NOT NULL, event_id TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (exp, event_id));
CREATE TABLE IF NOT EXISTS exp_registry (key TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS exp_visitors_visitor ON exp_visitors (visitor_id);
"""

# Files written before exp_records had its visitor id: the column is added by _index_records (the index on it
# is created there too, after the column exists).
_RECORDS_INDEX = "CREATE INDEX IF NOT EXISTS exp_records_visitor ON exp_records (visitor_id)"


class _Tx:
    """Increments collected inside one transaction, written at the end."""

    def __init__(self, arm: str, day: str):
        self.arm = arm
        self.day = day
        self.out: dict[str, float] = {}

    def add(self, group: str, name: str, value: float) -> None:
        key = f"{group}|{name}"
        self.out[key] = self.out.get(key, 0.0) + value


class SqliteExperimentStore(ExperimentStore):
    backend = "sqlite"

    def __init__(self, path: Any, dedupe_ttl_s: int = DEDUPE_TTL_S):
        # A connection of its own (the event store has another); WAL lets both services share the file.
        self._conn = connect_sqlite(Path(path), _SCHEMA)
        self.dedupe_ttl_s = dedupe_ttl_s  # how long a counted outcome event's id is remembered
        self._lock = threading.Lock()
        # One transaction, so processes opening the file together add the column once.
        self._transaction(self._index_records)

    @staticmethod
    def _index_records(conn: sqlite3.Connection) -> int:
        """Give every exposure record the visitor id it names (the column and its index added to older files),
        so erasure deletes by visitor id. Reads only rows without one: once after an upgrade, then nothing."""
        if "visitor_id" not in {row[1] for row in conn.execute("PRAGMA table_info(exp_records)")}:
            conn.execute("ALTER TABLE exp_records ADD COLUMN visitor_id TEXT")
        conn.execute(_RECORDS_INDEX)
        rows = conn.execute("SELECT exp, rec_id, data FROM exp_records WHERE visitor_id IS NULL").fetchall()
        named = [(visitor_id, exp, rec_id) for exp, rec_id, data in rows if (visitor_id := record_visitor(data))]
        conn.executemany("UPDATE exp_records SET visitor_id = ? WHERE exp = ? AND rec_id = ?", named)
        return len(named)

    def reindex(self) -> Reindexed:
        """What opening the file does (records a process of the previous version writes afterwards are matched
        by erase_visitor), with the number of experiments, which reads both tables."""

        def run(conn: sqlite3.Connection) -> Reindexed:
            indexed = self._index_records(conn)
            experiments = conn.execute(
                "SELECT COUNT(*) FROM (SELECT exp FROM exp_visitors UNION SELECT exp FROM exp_records)"
            ).fetchone()[0]
            return Reindexed(int(experiments), indexed)

        return cast(Reindexed, self._transaction(run))

    def _transaction(self, fn: Any) -> Any:
        try:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(self._conn)
                    self._conn.execute("COMMIT")
                    return result
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"experiment store unavailable: {type(exc).__name__}") from exc

    def _read(self, fn: Any) -> Any:
        try:
            with self._lock:
                return fn(self._conn)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"experiment store unavailable: {type(exc).__name__}") from exc

    @staticmethod
    def _visitor(conn: sqlite3.Connection, experiment_id: str, visitor_id: str) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT data FROM exp_visitors WHERE exp = ? AND visitor_id = ? AND expires_at > ?",
            (experiment_id, visitor_id, wall_time()),
        ).fetchone()
        return cast(dict[str, Any], json.loads(row[0])) if row else None

    @staticmethod
    def _flush(conn: sqlite3.Connection, experiment_id: str, tx: _Tx) -> None:
        upsert = " ON CONFLICT (exp, name) DO UPDATE SET value = value + excluded.value"
        conn.executemany(
            "INSERT INTO exp_sums (exp, name, value) VALUES (?, ?, ?)" + upsert,
            [(experiment_id, f"{tx.arm}|{name}", v) for name, v in tx.out.items()],
        )
        conn.executemany(
            "INSERT INTO exp_days (exp, name, value) VALUES (?, ?, ?)" + upsert,
            [
                (experiment_id, f"{tx.day}|{tx.arm}|{name[len(ALL) + 1 :]}", v)
                for name, v in tx.out.items()
                if name.startswith(ALL + "|")
            ],
        )

    def record_exposure(self, write: ExposureWrite) -> Applied:
        entries = denominator_args(write.denominators)
        check_record(write)
        covariates = covariate_args(write.covariates)

        def run(conn: sqlite3.Connection) -> Applied:
            visitor = self._visitor(conn, write.experiment_id, write.visitor_id)
            if visitor is not None and visitor["arm"] != write.arm:
                return Applied("arm_conflict", str(visitor["arm"]))
            # One exposure per recommendation (its stored record marks it), as the Redis script does.
            if (
                write.record
                and write.recommendation_id
                and conn.execute(
                    "SELECT 1 FROM exp_records WHERE exp = ? AND rec_id = ? AND expires_at > ?",
                    (write.experiment_id, write.recommendation_id, wall_time()),
                ).fetchone()
            ):
                return Applied("duplicate", write.arm)
            if visitor is None:
                visitor = {"arm": write.arm, "seg": clean_label(write.segment), "first": write.ts, "last": write.ts}
                visitor.update({f"cov|{metric}": value for metric, value in covariates})
            else:
                visitor["last"] = max(float(visitor["last"]), write.ts)
                visitor["first"] = min(float(visitor["first"]), write.ts)
            tx = _Tx(write.arm, day_of(write.ts))
            segment = f"seg:{visitor['seg']}"

            def enter(group: str) -> None:
                if f"{group}|n" not in visitor:
                    visitor[f"{group}|n"] = 1.0
                    tx.add(group, "n", 1.0)
                    for metric in METRICS:
                        c = visitor.get(f"cov|{metric}")
                        if c is not None:
                            if c > 0:
                                tx.add(group, f"{metric}|c", c)
                                tx.add(group, f"{metric}|c2", c * c)
                            tx.add(group, f"{metric}|cn", 1.0)

            enter(ALL)
            enter(segment)
            for group, metric, dy in entries:
                groups = [ALL, segment] if group == ALL else [group]
                if group != ALL:
                    enter(group)
                if dy <= 0:
                    continue
                for g in groups:
                    base = f"{g}|{metric}"
                    y_old = float(visitor.get(f"{base}|y", 0.0))
                    x_old = float(visitor.get(f"{base}|x", 0.0))
                    visitor[f"{base}|y"] = y_old + dy
                    tx.add(g, f"{metric}|y", dy)
                    tx.add(g, f"{metric}|y2", 2 * y_old * dy + dy * dy)
                    if x_old > 0:
                        tx.add(g, f"{metric}|xy", x_old * dy)
                    c = visitor.get(f"cov|{metric}")
                    if c is not None:
                        if c > 0:
                            tx.add(g, f"{metric}|cy", c * dy)
                        tx.add(g, f"{metric}|cyp", dy)
            now = wall_time()
            conn.execute(
                "INSERT INTO exp_visitors (exp, visitor_id, data, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (exp, visitor_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
                (write.experiment_id, write.visitor_id, json.dumps(visitor), now + VISITOR_TTL_S),
            )
            if write.record and write.recommendation_id:
                conn.execute(
                    "INSERT OR REPLACE INTO exp_records (exp, rec_id, data, expires_at, visitor_id)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        write.experiment_id,
                        write.recommendation_id,
                        json.dumps(write.record),
                        now + write.record_ttl_s,
                        write.visitor_id,
                    ),
                )
            self._flush(conn, write.experiment_id, tx)
            return Applied("ok", write.arm, tx.out)

        return cast(Applied, self._transaction(run))

    def _outcome(self, conn: sqlite3.Connection, write: OutcomeWrite) -> Applied:
        visitor = self._visitor(conn, write.experiment_id, write.visitor_id)
        if visitor is None:
            return Applied("not_exposed")
        arm = str(visitor["arm"])
        if write.expected_arm and write.expected_arm != arm:
            return Applied("arm_mismatch", arm)
        ts = write.ts
        if (write.lower is not None and ts < write.lower) or (write.upper is not None and ts > write.upper):
            return Applied("outside_window", arm)
        if write.window_s is not None and not (
            float(visitor["first"]) <= ts <= float(visitor["last"]) + write.window_s
        ):
            return Applied("outside_window", arm)
        now = wall_time()
        conn.execute("DELETE FROM exp_seen WHERE exp = ? AND event_id = ? AND expires_at <= ?", (
            write.experiment_id, write.event_id, now))  # fmt: skip
        inserted = conn.execute(
            "INSERT OR IGNORE INTO exp_seen (exp, event_id, expires_at) VALUES (?, ?, ?)",
            (write.experiment_id, write.event_id, now + self.dedupe_ttl_s),
        ).rowcount
        if inserted != 1:
            return Applied("duplicate", arm)
        groups = [ALL, f"seg:{visitor['seg']}"]
        if write.slot_group and f"{write.slot_group}|n" in visitor:
            groups.append(write.slot_group)
        tx = _Tx(arm, day_of(ts))
        for metric, mode, dx in value_args(write.values):
            for g in groups:
                base = f"{g}|{metric}"
                x_old = float(visitor.get(f"{base}|x", 0.0))
                y_old = float(visitor.get(f"{base}|y", 0.0))
                d = (0.0 if x_old > 0 else 1.0) if mode == "b" else dx
                if d <= 0:
                    continue
                visitor[f"{base}|x"] = x_old + d
                tx.add(g, f"{metric}|x", d)
                tx.add(g, f"{metric}|x2", 2 * x_old * d + d * d)
                if y_old > 0:
                    tx.add(g, f"{metric}|xy", y_old * d)
                c = visitor.get(f"cov|{metric}")
                if c is not None:
                    if c > 0:
                        tx.add(g, f"{metric}|cx", c * d)
                    tx.add(g, f"{metric}|cxp", d)
                if mode == "h":
                    for stat, amount in histogram_increments(x_old, d, c):
                        tx.add(g, f"{metric}|{stat}", amount)
        conn.execute(
            "UPDATE exp_visitors SET data = ? WHERE exp = ? AND visitor_id = ?",
            (json.dumps(visitor), write.experiment_id, write.visitor_id),
        )
        self._flush(conn, write.experiment_id, tx)
        return Applied("ok", arm, tx.out)

    def record_outcomes(self, writes: Sequence[OutcomeWrite]) -> list[Applied]:
        if not writes:
            return []
        return cast(list[Applied], self._transaction(lambda conn: [self._outcome(conn, w) for w in writes]))

    def exposure_records(
        self, experiment_ids: Sequence[str], recommendation_ids: Sequence[str]
    ) -> dict[str, tuple[str, dict[str, Any]]]:
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        if not experiment_ids or not recommendation_ids:
            return found
        now = wall_time()

        def run(conn: sqlite3.Connection) -> None:
            for recommendation_id in dict.fromkeys(recommendation_ids):
                for experiment_id in experiment_ids:
                    row = conn.execute(
                        "SELECT data FROM exp_records WHERE exp = ? AND rec_id = ? AND expires_at > ?",
                        (experiment_id, recommendation_id, now),
                    ).fetchone()
                    if row:
                        found[recommendation_id] = (experiment_id, json.loads(row[0]))
                        break

        self._read(run)
        return found

    def visitor_heads(
        self, experiment_ids: Sequence[str], visitor_ids: Sequence[str]
    ) -> dict[tuple[str, str], VisitorHead]:
        heads: dict[tuple[str, str], VisitorHead] = {}

        def run(conn: sqlite3.Connection) -> None:
            for visitor_id in dict.fromkeys(visitor_ids):
                for experiment_id in experiment_ids:
                    visitor = self._visitor(conn, experiment_id, visitor_id)
                    if visitor is not None:
                        heads[(experiment_id, visitor_id)] = VisitorHead(
                            str(visitor["arm"]), float(visitor["first"]), float(visitor["last"])
                        )

        self._read(run)
        return heads

    def raw_sums(self, experiment_id: str) -> dict[str, float]:
        rows = self._read(
            lambda c: c.execute("SELECT name, value FROM exp_sums WHERE exp = ?", (experiment_id,)).fetchall()
        )
        return {name: float(value) for name, value in rows}

    def raw_days(self, experiment_id: str) -> dict[str, float]:
        rows = self._read(
            lambda c: c.execute("SELECT name, value FROM exp_days WHERE exp = ?", (experiment_id,)).fetchall()
        )
        return {name: float(value) for name, value in rows}

    def publish_registry(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM exp_registry")
            conn.executemany(
                "INSERT INTO exp_registry (key, data) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in entries.items()]
            )

        self._transaction(run)

    def registry(self) -> dict[str, dict[str, Any]]:
        rows = self._read(lambda c: c.execute("SELECT key, data FROM exp_registry").fetchall())
        return {key: json.loads(data) for key, data in rows}

    def forget_visitor(self, experiment_ids: Sequence[str], visitor_id: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute("DELETE FROM exp_visitors WHERE exp = ? AND visitor_id = ?", (e, visitor_id)).rowcount
                for e in experiment_ids
            )

        return cast(int, self._transaction(run))

    def visitor_experiments(self, visitor_id: str) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT DISTINCT exp FROM exp_visitors WHERE visitor_id = ?", (visitor_id,))
            return sorted(str(row[0]) for row in rows.fetchall())

        return cast(list[str], self._transaction(run))

    def erase_visitor(self, visitor_id: str) -> ErasedVisitor:
        def run(conn: sqlite3.Connection) -> ErasedVisitor:
            values = conn.execute("DELETE FROM exp_visitors WHERE visitor_id = ?", (visitor_id,)).rowcount
            records = conn.execute("DELETE FROM exp_records WHERE visitor_id = ?", (visitor_id,)).rowcount
            # Rows without a visitor id: written by a process of the previous version since this file was
            # opened (a rolling upgrade), matched on the record they hold. None once every process is upgraded.
            rows = conn.execute("SELECT exp, rec_id, data FROM exp_records WHERE visitor_id IS NULL").fetchall()
            doomed = [(exp, rec_id) for exp, rec_id, data in rows if record_visitor(data) == visitor_id]
            conn.executemany("DELETE FROM exp_records WHERE exp = ? AND rec_id = ?", doomed)
            return ErasedVisitor(int(values), int(records) + len(doomed))

        return cast(ErasedVisitor, self._transaction(run))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
