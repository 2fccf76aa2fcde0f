"""Feature rows written to and read from Feast's online store without Feast's per-call dataframe conversion
(the views stay defined in Feast and Feast keeps reading them): the protobuf wire form of values, the reader and
the writer, and on Redis the hashes themselves (services/features/store.py holds the store's other parts)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from feast import FeatureStore

from services.features import schema as F
from services.features.schema import view_columns

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
        from feast.infra.key_encoding_utils import serialize_entity_key
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
        self._serialize_key = serialize_entity_key  # imported once, not per row
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
        # A cluster spreads the keys over nodes: redis-py's cluster pipeline routes each command.
        with client.pipeline(transaction=False) as pipe:
            for row in rows:
                redis_key, values = self._hset_args(row, version)
                mapping: dict[Any, bytes] = {self._ts_field: ts_bytes}
                mapping.update(zip((field for _, _, field in self._fields), values, strict=True))
                pipe.hset(redis_key, mapping=mapping)
                if ttl:
                    pipe.expire(name=redis_key, time=ttl)
            pipe.execute()

    def _hset_args(self, row: Mapping[str, Any], version: int) -> tuple[bytes, list[bytes]]:
        """(Redis key, the serialised values in `self._fields` order) of one row."""
        key = str(row[self.key])
        redis_key = self._redis_keys.get(key)
        if redis_key is None:
            if len(self._redis_keys) >= self.MEMO_SIZE:
                self._redis_keys.clear()
            entity = self._entity_key(join_keys=[self.key], entity_values=[self._value(string_val=key)])
            redis_key = self._serialize_key(entity, entity_key_serialization_version=version) + self._project
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
