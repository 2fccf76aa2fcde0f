"""The Feast store, configured from settings, and the writes/reads both services make through it.

Configuration is built in code from the same settings as everything else (`feature_repo/feature_store.yaml`
mirrors it for the plain `feast` CLI): SQLite online store by default, Redis when REDIS_URL is set,
DuckDB offline store over parquet part files that the profile service appends.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast import FeatureStore, RepoConfig

from services.common.clock import wall_datetime
from services.common.settings import CommonSettings
from services.features import schema as F
from services.features.offline_index import OfflineIndex, table_keys
from services.features.online import OnlineRowWriter
from services.features.schema import view_columns

log = logging.getLogger(__name__)
# Third-party notices that are noise in every log and first-run output. Importing Feast installs
# `simplefilter("once", DeprecationWarning)` ahead of the CLI's own filters, so these go in front again here:
# Feast warns on every `get_online_features` that on-demand views are "experimental" (ours are request-time
# transforms only), and ibis on every offline query that DuckDB's `fetch_arrow_table` is deprecated.
warnings.filterwarnings("ignore", message="On demand feature view is an experimental feature", category=RuntimeWarning)
warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated", category=DeprecationWarning)

ARROW_TYPES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "str_list": pa.list_(pa.string()),
    "float_list": pa.list_(pa.float64()),
}


def redis_connection_string(redis_url: str, timeout_s: float) -> str:
    """Feast's `host:port,db=N,password=...` form of a redis:// URL, with fail-fast timeouts."""
    url = urlparse(redis_url)
    parts = [f"{url.hostname or '127.0.0.1'}:{url.port or 6379}"]
    db = (url.path or "/0").lstrip("/") or "0"
    if db != "0":
        parts.append(f"db={db}")
    if url.password:
        parts.append(f"password={unquote(url.password)}")
    if url.scheme == "rediss":
        parts.append("ssl=true")
    # retry=null: no retries with backoff (redis-py's default held reads for seconds while Redis was down).
    parts += [f"socket_timeout={timeout_s}", f"socket_connect_timeout={timeout_s}", "retry=null"]
    return ",".join(parts)


def repo_config(settings: CommonSettings) -> RepoConfig:
    feast_dir = (settings.data_dir / "feast").resolve()
    feast_dir.mkdir(parents=True, exist_ok=True)
    online: dict[str, Any]
    if settings.redis_url:
        online = {
            "type": "redis",
            "connection_string": redis_connection_string(settings.redis_url, settings.redis_timeout_s),
            "redis_type": "redis_cluster" if settings.redis_cluster else "redis",
            # One pipeline per write instead of reading every row's timestamp first: rows are stamped with the
            # time they are written and each visitor's rows have one writer (the log's lease holder), so the
            # newest-timestamp check only cost a round trip per batch.
            "skip_dedup": True,
        }
        if settings.redis_cluster:
            # Feast's cluster client takes no db parameter.
            online["connection_string"] = ",".join(
                p for p in online["connection_string"].split(",") if not p.startswith("db=")
            )
    else:
        online = {"type": "sqlite", "path": str(feast_dir / "online.db")}
    return RepoConfig(
        project=settings.feast_project,
        provider="local",
        registry=str(feast_dir / f"registry-{settings.feast_project}.db"),
        online_store=online,
        offline_store={"type": "duckdb"},
        entity_key_serialization_version=3,
        repo_path=settings.feature_repo.resolve(),
    )


def _load_definitions_module(feature_repo: Path) -> Any:
    path = feature_repo / "feature_definitions.py"
    spec = importlib.util.spec_from_file_location("selaras_feature_definitions", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def definitions_fingerprint(feature_repo: Path) -> str:
    """Changes whenever the definitions or the feature lists change, so the registry is re-applied."""
    digest = hashlib.sha256()
    for path in (feature_repo / "feature_definitions.py", Path(F.__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """An advisory lock across processes (flock): exclusive, or `shared` with other shared holders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def exclusive_lock_within(path: Path, wait_s: float) -> Iterator[bool]:
    """The exclusive lock if it can be had within `wait_s` seconds (polled, so a waiting taker never queues
    behind a long holder while holding other locks); yields whether it was taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def offline_read_lock(offline_dir: Path | None) -> Iterator[None]:
    """Held (shared) while listing and reading many part files; nothing without an offline folder."""
    if offline_dir is None:
        yield
        return
    with file_lock(offline_read_lock_path(offline_dir), shared=True):
        yield


def offline_read_lock_path(offline_dir: Path) -> Path:
    """Readers of many part files (training's point-in-time joins, export) hold this lock shared while they
    list and read; compaction takes it exclusively to swap files, so no reader opens a file it removed."""
    return offline_dir / ".read.lock"


def open_feature_store(settings: CommonSettings) -> FeatureStore:
    """A FeatureStore whose registry holds the current definitions (applied once per change)."""
    config = repo_config(settings)
    store = FeatureStore(config=config)
    feast_dir = (settings.data_dir / "feast").resolve()
    fingerprint = definitions_fingerprint(settings.feature_repo)
    marker = feast_dir / f"applied-{settings.feast_project}-{'redis' if settings.redis_url else 'sqlite'}"
    with file_lock(feast_dir / f"apply-{settings.feast_project}.lock"):
        if not marker.exists() or marker.read_text() != fingerprint:
            module = _load_definitions_module(settings.feature_repo)
            offline_dir = settings.offline_dir.resolve()
            for view in (F.VISITOR_VIEW, F.ITEM_VIEW):
                (offline_dir / view).mkdir(parents=True, exist_ok=True)
            log.info("applying feature definitions", extra={"fingerprint": fingerprint})
            store.apply(module.build_definitions(offline_dir))
            marker.write_text(fingerprint)
    store.refresh_registry()
    return store


def arrow_schema(key: str, features: Mapping[str, F.FeatureKind]) -> pa.Schema:
    return pa.schema(
        [pa.field(key, pa.string()), pa.field(F.TIMESTAMP_FIELD, pa.timestamp("us", tz="UTC"))]
        + [pa.field(name, ARROW_TYPES[kind]) for name, kind in features.items()]
    )


def to_arrow_table(rows: Sequence[Mapping[str, Any]], key: str, features: Mapping[str, F.FeatureKind]) -> pa.Table:
    """Rows -> a typed arrow table (entity key, event timestamp, features); missing values become nulls."""
    return pa.Table.from_pylist(list(rows), schema=arrow_schema(key, features))


class FeatureWriter:
    """Writes feature rows online (Feast) and appends them offline as parquet part files (point-in-time)."""

    def __init__(self, store: FeatureStore, offline_dir: Path):
        self.store = store
        self.offline_dir = offline_dir.resolve()
        self._lock = threading.Lock()
        self._writers: dict[str, OnlineRowWriter] = {}

    def write(
        self, view: str, rows: Sequence[Mapping[str, Any]], offline: bool = True, part: str | None = None
    ) -> None:
        """`part`: a stable name for the offline part file (see `append_offline`)."""
        if not rows:
            return
        # The online row is stamped with the write time: Feast keeps the newest-stamped row, and a late
        # event (older event time) must still replace what is online.
        self._online_writer(view).write(rows, wall_datetime())
        if offline:
            key, features = view_columns(view)
            self.append_offline(view, to_arrow_table(rows, key, features), part)

    def _online_writer(self, view: str) -> OnlineRowWriter:
        with self._lock:
            writer = self._writers.get(view)
            if writer is None:
                writer = self._writers[view] = OnlineRowWriter(self.store, view)
            return writer

    def append_offline(self, view: str, table: pa.Table, part: str | None = None) -> Path:
        """Write one parquet part file. With a `part` name the file is `part-<part>.parquet` and writing the same
        part again replaces it: the aggregator names parts after the log position a batch starts at, so a
        batch folded again after a failure replaces its rows instead of adding them a second time."""
        directory = self.offline_dir / view
        directory.mkdir(parents=True, exist_ok=True)
        if part is None:
            stamp = wall_datetime().strftime("%Y%m%dT%H%M%S%f")
            part = f"{stamp}-{uuid.uuid4().hex[:8]}"
        path = directory / f"part-{part}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        index = offline_index(self.offline_dir, view)
        keys = table_keys(table, index.key) if index is not None else []
        # Under the view's write lock: an erasure rewriting this very file (a batch folded again) reads and
        # replaces it under the same lock, so neither puts a stale file or stale index entries over the other's.
        with file_lock(write_lock_path(self.offline_dir, view)):
            if index is not None and path.exists():
                index.add(path.name, keys)  # a batch folded again: the old file's visitors stay findable meanwhile
            tmp.rename(path)  # readers glob *.parquet and never see a half-written file
            if index is not None:
                index.replace(path.name, keys)
        return path

    def remove_offline_rows(self, view: str, part: str, keys: Sequence[str]) -> int:
        """Remove the rows of entities `keys` from the part file `append_offline` named `part`, if it exists;
        returns how many rows went. The aggregator's repair for visitors erased while their batch was in flight
        (the erasure may have rewritten the files holding them before this part was written). A file left
        empty stays (empty): deleting files is for rewriters under the rewrite lock, which may have listed it."""
        path = self.offline_dir / view / f"part-{part}.parquet"
        index = offline_index(self.offline_dir, view)
        key, _ = view_columns(view)
        # The write lock alone: the rewrite lock can be held for a whole retention or persona back-fill run.
        with file_lock(write_lock_path(self.offline_dir, view)):
            try:
                table = pq.read_table(path)
            except FileNotFoundError:
                return 0
            kept = table.filter(pc.invert(pc.is_in(table[key], pa.array(list(keys), pa.string()))))
            if kept.num_rows < table.num_rows:
                _replace_part(path, kept, index)
        return table.num_rows - kept.num_rows


def online_rows(store: FeatureStore, view: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Read rows from the online store; a missing entity comes back with every feature None."""
    key, features = view_columns(view)
    response = store.get_online_features(
        features=[f"{view}:{name}" for name in features], entity_rows=[{key: k} for k in keys]
    ).to_dict()
    return [{name: response[name][i] for name in (key, *features)} for i in range(len(keys))]


# -- deletion and rewriting (privacy: erasure, consent withdrawal, retention; persona backfill) -------------


def delete_online_entities(store: FeatureStore, view: str, keys: Sequence[str]) -> int:
    """Remove the entities' rows of `view` from the online store; returns how many rows existed.

    Feast's SDK has no per-entity delete, so this uses the online store's own key layout (Redis: the view's
    hash fields of the entity key; SQLite: the view's table rows). Any other store gets an all-null row,
    which reads exactly like a missing entity.
    """
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.redis import RedisOnlineStore, _versioned_fv_name
    from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    if not keys:
        return 0
    config = store.config
    feature_view = store.get_feature_view(view)
    join_key, _ = view_columns(view)
    entity_keys = [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=k)]) for k in keys]
    online = store._get_provider().online_store
    if isinstance(online, RedisOnlineStore):
        client = online._get_client(config.online_store)
        redis_keys = online._generate_redis_keys_for_entities(config, entity_keys)
        _, fields = online._generate_hset_keys_for_features(
            feature_view, fv_name_override=_versioned_fv_name(feature_view, config)
        )
        # An entity's hash holds every view of that entity: drop this view's fields only (Redis removes
        # the key once it is empty). One key per command keeps it valid on Redis Cluster too.
        return sum(1 for key in redis_keys if client.hdel(key, *fields))
    if isinstance(online, SqliteOnlineStore):
        conn = online._get_conn(config)
        table = _table_id(config.project, feature_view, config.registry.enable_online_feature_view_versioning)
        version = config.entity_key_serialization_version
        serialized = [serialize_entity_key(k, entity_key_serialization_version=version) for k in entity_keys]
        with conn:
            found = conn.execute(
                f'SELECT COUNT(DISTINCT entity_key) FROM "{table}" WHERE entity_key IN ({",".join("?" * len(keys))})',
                serialized,
            ).fetchone()[0]
            conn.executemany(f'DELETE FROM "{table}" WHERE entity_key = ?', [(s,) for s in serialized])
        return int(found)
    _, features = view_columns(view)
    nulls = [{join_key: k, F.TIMESTAMP_FIELD: wall_datetime()} for k in keys]
    frame = to_arrow_table(nulls, join_key, features).to_pandas()
    store.write_to_online_store(view, frame)
    return len(keys)


def offline_parts(offline_dir: Path, view: str) -> list[Path]:
    return sorted((offline_dir / view).glob("*.parquet"))


def offline_index(offline_dir: Path, view: str) -> OfflineIndex | None:
    """The entity key -> part file index of a view that keeps one (the visitor view: erasure and export)."""
    return OfflineIndex(offline_dir, view, F.VISITOR_KEY) if view == F.VISITOR_VIEW else None


def offline_parts_holding(offline_dir: Path, view: str, key: str) -> list[Path]:
    """The part files of an indexed view that may hold rows of entity `key` (never fewer than do), sorted.

    Asks the view's index; files it does not know yet (a store written before it existed) are indexed first,
    once. A file may be rewritten away by the time it is opened: readers skip a missing file."""
    index = offline_index(offline_dir, view)
    if index is None:
        raise ValueError(f"the offline view {view} keeps no index")
    return index.parts_holding(key)


def rewrite_offline_parts(
    offline_dir: Path, view: str, transform: Callable[[Path], pa.Table | None], key: str | None = None
) -> int:
    """Rewrite the view's parquet part files: `transform(path)` returns the new table, or None to keep the file.
    With `key`, only the files the view's index says hold rows of that entity are offered (erasure).

    Runs under the view's rewrite lock (rewriters exclude each other), each file read and replaced under its
    write lock as well (the writer adds new part files or replaces its own under that lock), and replaces files
    atomically, so readers globbing *.parquet see the old or the new file, never half of one. A file left empty
    is deleted, unless it is the view's last one (DuckDB needs a file to read the schema). The view's index
    follows every file changed. Returns how many files changed.
    """
    changed = 0
    index = offline_index(offline_dir, view)
    with file_lock(rewrite_lock_path(offline_dir, view)):
        paths = offline_parts(offline_dir, view) if key is None else offline_parts_holding(offline_dir, view, key)
        for path in paths:
            # Each file is read and replaced under the write lock, which the aggregator takes to write a part:
            # a batch folded again while an erasure rewrites its file replaces it before the erasure reads it or
            # after the erasure replaced it, never in between. Per file, so the aggregator waits for one file.
            with file_lock(write_lock_path(offline_dir, view)):
                table = transform(path)
                if table is None:
                    continue
                changed += 1
                if table.num_rows == 0 and len(offline_parts(offline_dir, view)) > 1:
                    path.unlink()
                    if index is not None:
                        index.remove([path.name])
                    continue
                _replace_part(path, table, index)
    return changed


# Rows per row group of rewritten and merged part files: a one-entity read skips the groups whose key range
# misses it (merged files are sorted by entity, services/features/compaction.py).
OFFLINE_ROW_GROUP_ROWS = 5_000


def rewrite_lock_path(offline_dir: Path, view: str) -> Path:
    """The lock rewriters of a view's part files hold (erasure, retention, persona back-fill, compaction)."""
    return offline_dir / f".{view}.rewrite.lock"


def write_lock_path(offline_dir: Path, view: str) -> Path:
    """The lock under which a view's part files are written or replaced, one file at a time (next to the view's
    folder, as the rewrite lock: readers of the folder expect parquet files only)."""
    return offline_dir / f".{view}.write.lock"


def _replace_part(path: Path, table: pa.Table, index: OfflineIndex | None) -> None:
    """Replace a part file by `table` atomically; the index covers the old and new rows until it names the new
    ones alone. The caller holds the view's write lock."""
    keys = table_keys(table, index.key) if index is not None else []
    if index is not None:
        index.add(path.name, keys)
    tmp = path.with_suffix(".rewrite.tmp")
    pq.write_table(table, tmp, row_group_size=OFFLINE_ROW_GROUP_ROWS)  # a merged file keeps its small row groups
    tmp.replace(path)
    if index is not None:
        index.replace(path.name, keys)
