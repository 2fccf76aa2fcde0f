"""CUPED covariates from the request's visitor row: which feature stands for which metric, and when a visitor
has no pre-period."""

from __future__ import annotations

import math

from services.experiments.covariates import (
    COUNT_COVARIATES,
    CTR_CLICKS,
    CTR_IMPRESSIONS,
    REVENUE_FEATURE,
    exposure_covariates,
)
from services.experiments.store.sums import METRICS
from services.features.schema import VISITOR_FEATURES, visitor_row_at

DAY = 86_400.0


def test_every_covariate_is_a_visitor_feature_and_a_metric() -> None:
    assert set(COUNT_COVARIATES) <= set(METRICS)
    assert {*COUNT_COVARIATES.values(), REVENUE_FEATURE, CTR_CLICKS, CTR_IMPRESSIONS} <= set(VISITOR_FEATURES)


def test_covariates_from_a_known_visitor_row() -> None:
    row = {"purchases_30d": 2, "carts_30d": 5, "rfm_monetary": 350_000.0, "rec_clicks_7d": 3, "rec_impressions_7d": 40}
    assert exposure_covariates(row) == {
        "conversion": 2.0,
        "add_to_cart": 5.0,
        "revenue": math.log1p(350_000.0),
        "ctr": 3 / 40,
    }


def test_no_row_or_no_impressions_means_no_pre_period() -> None:
    assert exposure_covariates(None) is None
    assert exposure_covariates({}) is None
    # A visitor who saw no recommendation has no pre-period CTR (rather than a made-up 0/0); counts stay.
    covariates = exposure_covariates({"purchases_30d": 0, "rec_clicks_7d": 0, "rec_impressions_7d": 0})
    assert covariates == {"conversion": 0.0}
    # Missing features (NaN), negatives and booleans are not values.
    assert exposure_covariates({"purchases_30d": float("nan"), "carts_30d": -1, "rfm_monetary": True}) is None


def test_windows_are_seen_from_the_request_time() -> None:
    """The point-in-time row: purchases more than 30 days before the request no longer count."""
    row = {"purchases_30d": 3, "last_seen_ts": 1_000_000.0, "rfm_monetary": 90_000.0}
    spend = math.log1p(90_000)
    assert exposure_covariates(visitor_row_at(row, 1_000_000.0 + 2 * DAY)) == {"conversion": 3.0, "revenue": spend}
    assert exposure_covariates(visitor_row_at(row, 1_000_000.0 + 31 * DAY)) == {"conversion": 0.0, "revenue": spend}
