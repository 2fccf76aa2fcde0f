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
import struct
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
from feast import FeatureStore, RepoConfig

from services.common.clock import wall_datetime
from services.common.settings import CommonSettings
from services.features import schema as F
from services.features.offline_index import OfflineIndex, table_keys

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


def view_columns(view: str) -> tuple[str, Mapping[str, F.FeatureKind]]:
    """A feature view's entity key and feature columns (the visitor view, else the item view)."""
    return (F.VISITOR_KEY, F.VISITOR_FEATURES) if view == F.VISITOR_VIEW else (F.ITEM_KEY, F.ITEM_FEATURES)


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


# The protobuf wire form of a Feast ValueProto holding a double (field 5, fixed 64-bit) or a DoubleList (field 15,
# length-delimited, its values packed in field 1). Byte-identical to `Value(...).SerializeToString()`
# (tests/features/test_online_encoding.py); written by hand because the aggregator encodes tens of float values
# per row and building a proto object for each cost more than the rest of the row's write.
_DOUBLE_TAG = bytes([5 << 3 | 1])
_DOUBLE_LIST_TAG = bytes([15 << 3 | 2])
_PACKED_VALUES_TAG = bytes([1 << 3 | 2])


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


_DOUBLE_STRUCT = struct.Struct("<d")


def encode_double(value: float) -> bytes:
    return _DOUBLE_TAG + _DOUBLE_STRUCT.pack(value)


def encode_double_list(values: Sequence[float]) -> bytes:
    if not values:
        return _DOUBLE_LIST_TAG + b"\x00"
    packed = struct.pack(f"<{len(values)}d", *values)
    inner = _PACKED_VALUES_TAG + _varint(len(packed)) + packed
    return _DOUBLE_LIST_TAG + _varint(len(inner)) + inner


def proto_value(value: Any) -> Any:
    """A Feast ValueProto as a Python value (None when unset)."""
    if value is None:
        return None
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    raw = getattr(value, kind)
    return list(raw.val) if kind.endswith("_list_val") else raw


class OnlineRowReader:
    """Reads one view's rows straight from the configured online store (Feast's OnlineStore interface).

    `get_online_features` builds a full response object with type conversions per call (~1 ms for one visitor
    row); the recommend hot path needs only the row, so it asks the provider's online store directly."""

    def __init__(self, store: FeatureStore, view: str):
        from feast.infra.provider import get_provider
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self.config = store.config
        self.provider = get_provider(store.config)
        self.view = store.get_feature_view(view)
        self.key, features = view_columns(view)
        self.features = list(features)
        self._entity_key, self._value = EntityKey, Value

    def read(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        entity_keys = [self._entity_key(join_keys=[self.key], entity_values=[self._value(string_val=k)]) for k in keys]
        # A copy: the Redis store appends its timestamp key to the list it is given.
        rows = self.provider.online_read(self.config, self.view, entity_keys, list(self.features))
        out: list[dict[str, Any] | None] = []
        for _, values in rows:
            out.append(None if not values else {name: proto_value(values.get(name)) for name in self.features})
        return out


class OnlineRowWriter:
    """Writes one view's rows straight to the configured online store (Feast's OnlineStore interface).

    `FeatureStore.write_to_online_store` takes a dataframe and converts it to arrow and then to protos on every
    call: 60% of the aggregator's time per batch, measured. The rows are plain dicts already, so this builds the
    protos directly and hands them to the provider's `online_write_batch`, as Feast does after converting. The
    views stay defined in Feast and Feast keeps reading them (`get_online_features`).

    On Redis the rows go one step further, straight into the hashes Feast's Redis store reads (its own key
    and field helpers, the same bytes as its `online_write_batch` with `skip_dedup`: proved by
    tests/profile/test_online_row_layout.py): Feast's write hashes every feature name per row (murmur3) and
    serialises a fresh proto per value, the largest cost of a fold after the previous step. Here the field
    names are hashed once per view and serialised values are reused (most values repeat: counts, segments)."""

    # Serialised values kept for reuse; cleared when full (a cache, never needed for correctness).
    MEMO_SIZE = 200_000

    def __init__(self, store: FeatureStore, view: str):
        from feast.infra.online_stores.helpers import _mmh3
        from feast.infra.online_stores.redis import RedisOnlineStore, _versioned_fv_name
        from feast.infra.provider import get_provider
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import DoubleList, StringList, Value

        self.config = store.config
        self.provider = get_provider(store.config)
        self.view = store.get_feature_view(view)
        self.key, features = view_columns(view)
        self.features = dict(features)
        self._entity_key, self._value, self._doubles, self._strings = EntityKey, Value, DoubleList, StringList
        online = self.provider.online_store
        self._redis: RedisOnlineStore | None = online if isinstance(online, RedisOnlineStore) else None
        if self._redis is not None:
            name = _versioned_fv_name(self.view, self.config)
            self._ts_field = f"_ts:{name}"
            self._fields = [(feature, kind, _mmh3(f"{name}:{feature}")) for feature, kind in self.features.items()]
            self._project = self.config.project.encode("utf-8")
        self._memo: dict[tuple[str, Any], bytes] = {}
        self._redis_keys: dict[str, bytes] = {}  # entity id -> its Redis key (ids repeat: active visitors, items)
        self._empty = Value().SerializeToString()
        self._packed_fields: list[bytes] | None = None  # RESP forms of the field names (`_send_hsets`)
        self._field_encoders: list[tuple[str, Callable[[Any], bytes]]] | None = None
        self._packed_ts_field = b""

    def _proto(self, kind: F.FeatureKind, value: Any) -> Any:
        """A value as the ValueProto of its Feast type (int Int64, float Float64, ...); None stays unset."""
        if value is None:
            return self._value()
        if kind == "int":
            return self._value(int64_val=int(value))
        if kind == "float":
            return self._value(double_val=float(value))
        if kind == "str":
            return self._value(string_val=str(value))
        if kind == "str_list":
            return self._value(string_list_val=self._strings(val=[str(v) for v in value]))
        return self._value(double_list_val=self._doubles(val=[float(v) for v in value]))

    def _encoded(self, kind: F.FeatureKind, value: Any) -> bytes:
        """The serialised ValueProto of a value. Ints, strings and string lists repeat a lot and are reused;
        floats are not (rarely equal, and 0.0 == -0.0 would make a cache return the other one's bytes): their
        wire form is written directly (`encode_double`), a third of a visitor row's write time with protos."""
        if value is None:
            return self._empty
        if kind == "float":
            return encode_double(float(value))
        if kind == "float_list":
            return encode_double_list([float(v) for v in value])
        memo_key = (kind, tuple(value) if kind == "str_list" else value)
        found = self._memo.get(memo_key)
        if found is None:
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            found = self._memo[memo_key] = bytes(self._proto(kind, value).SerializeToString())
        return found

    def write(self, rows: Sequence[Mapping[str, Any]], at: datetime) -> None:
        if self._redis is not None:
            self._write_redis(self._redis, rows, at)
            return
        data: list[Any] = [
            (
                self._entity_key(join_keys=[self.key], entity_values=[self._value(string_val=str(row[self.key]))]),
                {name: self._proto(kind, row.get(name)) for name, kind in self.features.items()},
                at,
                None,
            )
            for row in rows
        ]
        self.provider.online_write_batch(self.config, self.view, data, progress=None)

    def _write_redis(self, online: Any, rows: Sequence[Mapping[str, Any]], at: datetime) -> None:
        """What Feast's `RedisOnlineStore.online_write_batch` (skip_dedup) stores, in one pipeline."""
        from feast.infra.key_encoding_utils import serialize_entity_key
        from google.protobuf.timestamp_pb2 import Timestamp

        store_config = self.config.online_store
        client = online._get_client(store_config)
        stamp = Timestamp()
        stamp.FromDatetime(at if at.tzinfo else at.replace(tzinfo=UTC))
        ts_bytes = stamp.SerializeToString()
        version = self.config.entity_key_serialization_version
        ttl = store_config.key_ttl_seconds
        if isinstance(client, redis.Redis):
            self._send_hsets(client, [self._hset_args(row, version) for row in rows], ts_bytes, ttl)
            return
        with client.pipeline(transaction=False) as pipe:
            for row in rows:
                key = str(row[self.key])
                redis_key = self._redis_keys.get(key)
                if redis_key is None:
                    if len(self._redis_keys) >= self.MEMO_SIZE:
                        self._redis_keys.clear()
                    entity = self._entity_key(join_keys=[self.key], entity_values=[self._value(string_val=key)])
                    redis_key = serialize_entity_key(entity, entity_key_serialization_version=version) + self._project
                    self._redis_keys[key] = redis_key
                mapping: dict[Any, bytes] = {self._ts_field: ts_bytes}
                for feature, kind, field_key in self._fields:
                    mapping[field_key] = self._encoded(kind, row.get(feature))
                pipe.hset(redis_key, mapping=mapping)
                if ttl:
                    pipe.expire(name=redis_key, time=ttl)
            pipe.execute()

    def _hset_args(self, row: Mapping[str, Any], version: int) -> tuple[bytes, list[bytes]]:
        """(Redis key, the serialised values in `self._fields` order) of one row."""
        from feast.infra.key_encoding_utils import serialize_entity_key

        key = str(row[self.key])
        redis_key = self._redis_keys.get(key)
        if redis_key is None:
            if len(self._redis_keys) >= self.MEMO_SIZE:
                self._redis_keys.clear()
            entity = self._entity_key(join_keys=[self.key], entity_values=[self._value(string_val=key)])
            redis_key = serialize_entity_key(entity, entity_key_serialization_version=version) + self._project
            self._redis_keys[key] = redis_key
        if self._field_encoders is None:
            self._field_encoders = [(feature, self._encoder(kind)) for feature, kind, _ in self._fields]
        return redis_key, [encode(row.get(feature)) for feature, encode in self._field_encoders]

    def _encoder(self, kind: F.FeatureKind) -> Callable[[Any], bytes]:
        """`_encoded` for one kind, the kind's branch chosen once per field instead of once per value."""
        empty = self._empty
        if kind == "float":
            pack = _DOUBLE_STRUCT.pack
            return lambda value: empty if value is None else _DOUBLE_TAG + pack(float(value))
        return lambda value: self._encoded(kind, value)

    def _send_hsets(
        self, client: redis.Redis, rows: Sequence[tuple[bytes, list[bytes]]], ts_bytes: bytes, ttl: int | None
    ) -> None:
        """The rows' HSETs (and EXPIREs) as one hand-packed RESP pipeline on one connection. redis-py's pipeline
        builds a command object per row and packs every argument through its encoder: with ~60 fields a row,
        that was a third of writing the online rows (the largest step of a fold at small batches). The field
        names' RESP form is packed once per writer; every reply is read, an error reply raised."""
        if self._packed_fields is None:
            self._packed_fields = [_bulk(field) for _, _, field in self._fields]
            self._packed_ts_field = _bulk(self._ts_field.encode())
        head = b"*%d\r\n$4\r\nHSET\r\n" % (2 * len(self._fields) + 4)
        packed_ts = _bulk(ts_bytes)
        parts: list[bytes] = []
        for redis_key, values in rows:
            key = _bulk(redis_key)
            parts += (head, key, self._packed_ts_field, packed_ts)
            for field, value in zip(self._packed_fields, values, strict=True):
                parts += (field, b"$%d\r\n" % len(value), value, b"\r\n")
            if ttl:
                parts += (b"*3\r\n$6\r\nEXPIRE\r\n", key, _bulk(str(int(ttl)).encode()))
        commands = len(rows) * (2 if ttl else 1)
        connection = client.connection_pool.get_connection()
        try:
            connection.send_packed_command([b"".join(parts)])
            for _ in range(commands):
                connection.read_response()  # raises an error reply (ResponseError)
        except BaseException:
            connection.disconnect()  # replies may be left unread: the connection's state is unknown
            raise
        finally:
            client.connection_pool.release(connection)


def _bulk(data: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


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
