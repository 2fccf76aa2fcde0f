"""Which offline part files hold an entity's rows: an embedded SQLite index of a view's parquet part files.

Erasure and export of one visitor would otherwise read every part file of the visitor view (one per folded
batch, each spanning the whole visitor-id range, so parquet statistics cannot rule a file out). The index maps
entity key -> part file name, so they open only the files that hold the visitor.

It is a database beside the view's folder, `<offline_dir>/.<view>.index.sqlite` (Feast and DuckDB read the
folder and expect parquet files only), in WAL mode: the aggregator, the persona job and erasure write it from
different processes, each change one short `BEGIN IMMEDIATE` transaction. On a network file system (the
Kubernetes offline store is a ReadWriteMany volume shared by pods on several nodes) WAL is unsafe: its index of
the log lives in shared memory on one host. There the database uses the rollback journal and the file
system's own locks, the locks the part files' rewrite lock already relies on (`journal_mode`). Only
services/features/store.py uses it, from the places that write part files (`FeatureWriter.append_offline`,
`FeatureWriter.remove_offline_rows`, `rewrite_offline_parts`).

The rule that keeps readers right: for every part file on disk, either the index holds a *superset* of the
keys in the file, or the file is not in the index at all (then a reader indexes it from the file before
answering). Writers therefore record a replaced file's new keys next to the old ones before the rename and
the exact keys after it; a file that left the folder is dropped from the index by the next reader.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# Files indexed from disk per transaction while catching up: keeps each write lock short.
CATCH_UP_CHUNK = 100
# File systems whose files other hosts open too (/proc/mounts type names; "nfs*" and "fuse.*" count as well).
NETWORK_FILESYSTEMS = frozenset({"cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "9p", "afs", "beegfs"})

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS parts (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS entries (key TEXT NOT NULL, part INTEGER NOT NULL, PRIMARY KEY (key, part))"
    " WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS entries_by_part ON entries (part)",
)


def index_path(offline_dir: Path, view: str) -> Path:
    return offline_dir / f".{view}.index.sqlite"


def table_keys(table: pa.Table, key: str) -> list[str]:
    """The distinct entity keys of a part's table."""
    return [k for k in pc.unique(table[key]).to_pylist() if k is not None]


@dataclass
class _Shared:
    """One process's connection to an index file, used by one thread at a time (each use is one short call)."""

    pid: int
    inode: int
    conn: sqlite3.Connection
    lock: threading.Lock = field(default_factory=threading.Lock)


# Connections kept open: closing the last connection to a WAL database checkpoints it and deletes the WAL
# (an fsync), which made every part file written cost ~20 ms instead of ~2. A few index files at most per
# process; the oldest is dropped past the limit (it closes once no thread uses it).
_SHARED: dict[Path, _Shared] = {}
_SHARED_LOCK = threading.Lock()
_SHARED_LIMIT = 8


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system holding `path` (the longest mount point containing it in /proc/mounts), or
    None where the mount table cannot be read."""
    try:
        text = mounts if mounts is not None else Path("/proc/mounts").read_text()
    except OSError:
        return None
    where = str(path.resolve())
    best, kind = "", None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = where == mount or where.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def journal_mode(folder: Path, mounts: str | None = None) -> str:
    """WAL on a local file system; the rollback journal on a network one, where processes of other hosts may
    open the same database and WAL's shared-memory index would not be shared with them."""
    kind = filesystem_type(folder, mounts)
    network = kind is not None and (kind in NETWORK_FILESYSTEMS or kind.startswith(("nfs", "fuse.")))
    return "DELETE" if network else "WAL"


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _shared(path: Path) -> _Shared:
    """The process's open connection to the index file, opened again after a fork or when the file was deleted
    or replaced (deleting the index makes the next reader rebuild it from the part files)."""
    with _SHARED_LOCK:
        shared = _SHARED.get(path)
        if shared is not None and shared.pid == os.getpid() and shared.inode == _inode(path):
            return shared
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        mode = journal_mode(path.parent)
        conn.execute(f"PRAGMA journal_mode={mode}")
        # NORMAL stays consistent after a crash and may lose the last commits after a power cut: a lost entry is
        # a file not in the index, which the next reader indexes from the file.
        conn.execute("PRAGMA synchronous=NORMAL")
        if mode == "WAL":
            # Each part's visitors land on as many random pages of the key index; checkpointing (two fsyncs)
            # every 1,000 pages, the default, was half the cost of recording a part. At most ~40 MB of WAL.
            conn.execute("PRAGMA wal_autocheckpoint=10000")
        else:
            log.info("offline index on a network file system: rollback journal", extra={"index": path.name})
        for statement in SCHEMA:
            conn.execute(statement)
        _SHARED.pop(path, None)
        while len(_SHARED) >= _SHARED_LIMIT:
            _SHARED.pop(next(iter(_SHARED)))
        shared = _SHARED[path] = _Shared(os.getpid(), path.stat().st_ino, conn)
        return shared


class OfflineIndex:
    """Entity key -> part files of one offline view. Cheap to make: the connection is the process's shared one,
    and each call is one short transaction."""

    def __init__(self, offline_dir: Path, view: str, key: str):
        self.folder = offline_dir / view
        self.path = index_path(offline_dir, view)
        self.key = key

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        shared = _shared(self.path)
        with shared.lock:
            try:
                yield shared.conn
            except BaseException:
                if shared.conn.in_transaction:
                    shared.conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _part_id(conn: sqlite3.Connection, name: str) -> int:
        conn.execute("INSERT OR IGNORE INTO parts (name) VALUES (?)", (name,))
        return int(conn.execute("SELECT id FROM parts WHERE name = ?", (name,)).fetchone()[0])

    # -- writers --------------------------------------------------------------------------------------
    def add(self, name: str, keys: Iterable[str]) -> None:
        """Before a part file is replaced under its name: its entries cover the file on disk and the new rows
        `keys` until `replace` records the new file alone. A part the index does not know yet has the keys of
        the file on disk read first: once known, readers no longer read it themselves."""
        with self._connect() as conn:
            known = conn.execute("SELECT 1 FROM parts WHERE name = ?", (name,)).fetchone() is not None
        current: list[str] = []
        if not known:
            with suppress(FileNotFoundError):  # deleted since, left empty by a rewrite: nothing to cover
                current = table_keys(pq.read_table(self.folder / name, columns=[self.key]), self.key)
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            part = self._part_id(conn, name)
            conn.executemany(
                "INSERT OR IGNORE INTO entries (key, part) VALUES (?, ?)", ((k, part) for k in {*keys, *current})
            )
            conn.execute("COMMIT")

    def replace(self, name: str, keys: Iterable[str]) -> None:
        """The part's entries are exactly `keys` (after the file with these rows was renamed into place)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            part = self._part_id(conn, name)
            conn.execute("DELETE FROM entries WHERE part = ?", (part,))
            conn.executemany("INSERT INTO entries (key, part) VALUES (?, ?)", ((k, part) for k in set(keys)))
            conn.execute("COMMIT")

    def remove(self, names: Sequence[str]) -> None:
        """Forget parts that left the folder."""
        if not names:
            return
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            for name in names:
                row = conn.execute("SELECT id FROM parts WHERE name = ?", (name,)).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM entries WHERE part = ?", (row[0],))
                    conn.execute("DELETE FROM parts WHERE id = ?", (row[0],))
            conn.execute("COMMIT")

    # -- readers --------------------------------------------------------------------------------------
    def parts_holding(self, key: str) -> list[Path]:
        """The part files that may hold rows of `key` (a superset, never fewer), sorted by name. Catches the
        index up with the folder first: files it does not know (a store written before the index existed, or a
        part renamed into place a moment ago) are read and indexed, files that are gone are dropped."""
        self.catch_up()
        with self._connect() as conn:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT parts.name FROM entries JOIN parts ON parts.id = entries.part WHERE entries.key = ?",
                    (key,),
                )
            ]
        return [self.folder / name for name in sorted(names)]

    def catch_up(self) -> int:
        """Index the part files on disk that the index does not know; returns how many were read."""
        # Names only (os.listdir: a third of Path.glob's time on 2,000 files): what is in a file is the index's.
        names = os.listdir(self.folder) if self.folder.is_dir() else []
        on_disk = {name for name in names if name.endswith(".parquet")}
        with self._connect() as conn:
            known = {row[0] for row in conn.execute("SELECT name FROM parts")}
        # Checked again one by one: a part may have been renamed into place since the folder was listed.
        self.remove([name for name in sorted(known - on_disk) if not (self.folder / name).exists()])
        missing = sorted(on_disk - known)
        if not missing:
            return 0
        log.info(
            "indexing offline part files",
            extra={"view": self.folder.name, "files": len(missing), "indexed": len(known)},
        )
        for start in range(0, len(missing), CATCH_UP_CHUNK):
            found: dict[str, list[str]] = {}
            for name in missing[start : start + CATCH_UP_CHUNK]:
                try:
                    found[name] = table_keys(pq.read_table(self.folder / name, columns=[self.key]), self.key)
                except FileNotFoundError:
                    continue  # rewritten away since the listing
            self._insert_absent(found)
        return len(missing)

    def _insert_absent(self, found: dict[str, list[str]]) -> None:
        """Record parts read from disk, unless a writer recorded them meanwhile (its entries are newer)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            for name, keys in found.items():
                if conn.execute("INSERT OR IGNORE INTO parts (name) VALUES (?)", (name,)).rowcount != 1:
                    continue
                part = self._part_id(conn, name)
                conn.executemany("INSERT INTO entries (key, part) VALUES (?, ?)", ((k, part) for k in keys))
            conn.execute("COMMIT")
