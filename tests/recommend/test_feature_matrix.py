"""The ranker's feature matrix (shared by training and serving): each column is the snapshot's value for the
candidate's own row, whatever order the candidates come in."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.features.item_cache import build_snapshot, category_code
from services.recommend.ranking.candidates import VisitorVector
from services.recommend.ranking.ranker import FEATURE_INDEX, feature_matrix
from tests.factories import BASE_TIME, make_item


def test_columns_are_the_candidates_own_values_in_any_order() -> None:
    items = [
        make_item(item_id="a", category="c1", stock=3, price=100_000),
        make_item(item_id="b", category="c2", stock=10, price=50_000),
        make_item(item_id="c", category="c3", stock=None),
        make_item(item_id="d", category="c1", stock=0),
    ]
    stats = {"a": {"views_7d": 50, "ctr_7d": 0.1}, "d": {"views_24h": 4, "trend_score": 1.5}}
    now = BASE_TIME.timestamp()
    snapshot = build_snapshot(items, stats, {}, {}, now=now)
    # b seen last, then a, then b again: b keeps its older view's value, as a table over views in order would.
    row = {"event_count": 3, "recent_items": ["b", "a", "b"], "cart_items": ["c"], "views_24h": 7}
    visitor = VisitorVector.from_row("v", row)
    idx = np.array([2, 0, 1, 3])
    X = feature_matrix(visitor, {"hour": 20}, snapshot.columns(idx, "home", now), {}, np.full(4, 0.5), now)

    def column(name: str) -> list[float]:
        return X[:, FEATURE_INDEX[name]].tolist()

    assert column("x_recently_viewed") == [0.0, 0.5, pytest.approx(1 / 3), 0.0]
    assert column("x_in_cart") == [1.0, 0.0, 0.0, 0.0]
    assert column("i_low_stock") == [0.0, 1.0, 0.0, 1.0]  # c: stock unknown
    assert column("i_category_code") == [float(category_code(c)) for c in ("c3", "c1", "c2", "c1")]
    assert column("i_log_price")[1:3] == [math.log1p(100_000), math.log1p(50_000)]
    assert column("i_views_7d")[1] == 50.0 and math.isnan(column("i_views_7d")[0])
    assert column("i_views_24h")[3] == 4.0 and column("i_trend_score")[3] == 1.5
    assert column("i_popularity") == np.log1p(snapshot.popularity_score[idx]).tolist()
    assert column("i_age_days") == [pytest.approx(30.0)] * 4
    assert column("c_hour") == [20.0] * 4 and column("v_views_24h") == [7.0] * 4
    assert all(math.isnan(v) for v in column("c_device_code"))

    generic = feature_matrix(visitor, {"hour": 20}, snapshot.columns(idx, "home", now), {}, np.full(4, 0.5), now, False)
    assert all(math.isnan(v) for v in generic[:, FEATURE_INDEX["x_recently_viewed"]])
    assert all(math.isnan(v) for v in generic[:, FEATURE_INDEX["v_views_24h"]])
    assert np.array_equal(generic[:, FEATURE_INDEX["i_log_price"]], X[:, FEATURE_INDEX["i_log_price"]], equal_nan=True)
    assert feature_matrix(visitor, {}, snapshot.columns(idx[:0], "home", now), {}, np.zeros(0), now).shape == (
        0,
        len(FEATURE_INDEX),
    )
