"""The aggregator writes feature rows straight into the Redis hashes Feast's Redis online store reads. Those
hashes must hold byte for byte what Feast's own `online_write_batch` stores for the same rows, and
`get_online_features` must return exactly the values written."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from services.common.settings import CommonSettings
from services.features import schema as F
from services.features.online import OnlineRowWriter
from services.features.store import online_rows, open_feature_store
from tests.conftest import REDIS_URL

AT = datetime(2026, 11, 20, 12, 30, 15, 123456, tzinfo=UTC)


def sample_rows(key: str, features: dict[str, F.FeatureKind], count: int) -> list[dict[str, Any]]:
    """Rows with every kind of value: repeated ones (the writer reuses their bytes), unset ones, negative zero
    (equal to 0.0 but serialised differently), empty lists."""
    values: dict[str, list[Any]] = {
        "int": [3, 0, -7, 3, None, 2**40],
        "float": [0.25, -0.0, 0.0, 1e-300, None, 3.5],
        "str": ["Jakarta", "", "Jakarta", "ü-ß", None, "x"],
        "str_list": [["p1", "p2"], [], ["p1", "p2"], ["ü"], None, ["p1"]],
        "float_list": [[0.5, 2.0], [], [-0.0], [1.0, 1.0], None, [0.0]],
    }
    rows = []
    for n in range(count):
        row: dict[str, Any] = {key: f"{key}-{n}"}
        for index, (name, kind) in enumerate(features.items()):
            row[name] = values[kind][(n + index) % len(values[kind])]
        rows.append(row)
    return rows


def stored_hashes(client: redis.Redis, keys: list[bytes]) -> list[dict[bytes, bytes]]:
    return [client.hgetall(key) for key in keys]


def test_direct_rows_equal_feasts_own_write_and_read_back(settings_factory: Callable[..., Any]) -> None:
    settings: CommonSettings = settings_factory()
    store = open_feature_store(settings)
    client = redis.Redis.from_url(REDIS_URL)
    for view, key, features in (
        (F.VISITOR_VIEW, F.VISITOR_KEY, F.VISITOR_FEATURES),
        (F.ITEM_VIEW, F.ITEM_KEY, F.ITEM_FEATURES),
    ):
        writer = OnlineRowWriter(store, view)
        assert writer._redis is not None  # the direct path is the one under test
        rows = sample_rows(key, dict(features), 12)
        redis_keys = [
            writer._redis._generate_redis_keys_for_entities(
                store.config,
                [writer._entity_key(join_keys=[key], entity_values=[writer._value(string_val=row[key])])],
            )[0]
            for row in rows
        ]

        # Feast's own write of the same rows (what `online_write_batch` stores), then ours in its place.
        feast_data = [
            (
                writer._entity_key(join_keys=[key], entity_values=[writer._value(string_val=row[key])]),
                {name: writer._proto(kind, row.get(name)) for name, kind in features.items()},
                AT,
                None,
            )
            for row in rows
        ]
        writer.provider.online_write_batch(store.config, writer.view, feast_data, progress=None)
        by_feast = stored_hashes(client, redis_keys)
        client.delete(*redis_keys)
        writer.write(rows, AT)
        ours = stored_hashes(client, redis_keys)
        assert ours == by_feast
        assert all(len(h) == len(features) + 1 for h in ours)  # every feature and the timestamp

        # And Feast's reader returns exactly the values written (-0.0 == 0.0 here; the bytes above differ).
        found = online_rows(store, view, [row[key] for row in rows])
        for written, read in zip(rows, found, strict=True):
            for name in features:
                expected = written[name]
                assert read[name] == expected, (view, name, written[key])
    client.close()


def test_reused_values_do_not_leak_between_rows(settings_factory: Callable[..., Any]) -> None:
    """The writer keeps serialised values for reuse; a row written after many others holds its own values."""
    settings: CommonSettings = settings_factory()
    store = open_feature_store(settings)
    writer = OnlineRowWriter(store, F.ITEM_VIEW)
    writer.MEMO_SIZE = 5  # clears the reuse cache many times over during the write
    rows = [
        {F.ITEM_KEY: f"item-{n}", **{name: (n if kind == "int" else None) for name, kind in F.ITEM_FEATURES.items()}}
        for n in range(40)
    ]
    writer.write(rows, AT)
    found = online_rows(store, F.ITEM_VIEW, [row[F.ITEM_KEY] for row in rows])
    for n, read in enumerate(found):
        for name, kind in F.ITEM_FEATURES.items():
            assert read[name] == (n if kind == "int" else None)


def test_an_error_reply_fails_the_write_and_the_next_write_starts_clean(settings_factory: Callable[..., Any]) -> None:
    """The rows go out as one hand-packed pipeline: an error reply for one row (a key of another type) fails the
    whole write, as redis-py's pipeline would, and leaves no unread reply for the next write on that connection.
    With a key TTL configured, every row's key gets it."""
    settings: CommonSettings = settings_factory()
    store = open_feature_store(settings)
    writer = OnlineRowWriter(store, F.ITEM_VIEW)
    client = redis.Redis.from_url(REDIS_URL)
    rows = sample_rows(F.ITEM_KEY, dict(F.ITEM_FEATURES), 5)
    keys = [writer._hset_args(row, store.config.entity_key_serialization_version)[0] for row in rows]
    client.set(keys[2], b"not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        writer.write(rows, AT)
    client.delete(keys[2])
    store.config.online_store.key_ttl_seconds = 600
    writer.write(rows, AT)
    found = online_rows(store, F.ITEM_VIEW, [row[F.ITEM_KEY] for row in rows])
    assert [r["views_24h"] for r in found] == [row["views_24h"] for row in rows]
    assert all(590 <= int(client.ttl(k)) <= 600 for k in keys)  # type: ignore[arg-type]
    client.delete(*keys)
    client.close()
