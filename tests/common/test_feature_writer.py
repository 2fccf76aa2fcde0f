"""Feature rows written straight through the online store interface (no dataframe conversion) read back
unchanged through Feast's own `get_online_features`, on Redis and on the embedded SQLite store."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from services.common.settings import CommonSettings
from services.features import schema as F
from services.features.store import FeatureWriter, online_rows, open_feature_store
from tests.conftest import REDIS_URL

SAMPLES: dict[str, list[Any]] = {
    "int": [3, 0],
    "float": [0.25, -1.5],
    "str": ["Jakarta", ""],
    "str_list": [["p1", "p2"], []],
    "float_list": [[0.5, 2.0], []],
}


def row(key: str, value: str, features: dict[str, F.FeatureKind], variant: int) -> dict[str, Any]:
    values = {name: SAMPLES[kind][variant] for name, kind in features.items()}
    first = next(iter(features))
    values[first] = None  # a missing value stays missing
    return {key: value, F.TIMESTAMP_FIELD: datetime(2026, 11, 20, tzinfo=UTC), **values}


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_written_rows_read_back_through_get_online_features(backend: str, settings_factory: Callable[..., Any]) -> None:
    settings: CommonSettings = settings_factory(redis_url=REDIS_URL if backend == "redis" else None)
    store = open_feature_store(settings)
    writer = FeatureWriter(store, settings.offline_dir)
    for view, key, features in (
        (F.VISITOR_VIEW, F.VISITOR_KEY, F.VISITOR_FEATURES),
        (F.ITEM_VIEW, F.ITEM_KEY, F.ITEM_FEATURES),
    ):
        rows = [row(key, f"{view}-a", features, 0), row(key, f"{view}-b", features, 1)]
        writer.write(view, rows, offline=False)
        found = online_rows(store, view, [f"{view}-a", f"{view}-b", f"{view}-missing"])
        for written, read in zip(rows, found, strict=False):
            expected = {name: written[name] for name in features}
            assert {name: read[name] for name in features} == expected
        assert all(found[2][name] is None for name in features)
        # A second write replaces the row (the aggregator rewrites rows after every batch).
        writer.write(view, [row(key, f"{view}-a", features, 1)], offline=False)
        again = online_rows(store, view, [f"{view}-a"])[0]
        assert {name: again[name] for name in features} == {name: row(key, "x", features, 1)[name] for name in features}
