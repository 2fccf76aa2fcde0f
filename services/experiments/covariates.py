"""CUPED covariates at serve time: the visitor's pre-exposure value of each metric, from the visitor row the
request already read (pure).

The recommend and message services pass `exposure_covariates(row)` to the runtime's `record_exposure`; the store
keeps them from the visitor's first exposure only (frozen, like the persona), so later requests cannot leak
treatment effects into the covariate. The row must be the point-in-time row of the request
(`services.features.schema.visitor_row_at(row, now)`), so windows that ended before the request read 0.

Which feature stands for which metric (docs/statistics.md, "Serving covariates"):

| metric | covariate |
|---|---|
| ctr | rec_clicks_7d / rec_impressions_7d (no recommendation seen in 7 days: no pre-period) |
| conversion | purchases_30d |
| add_to_cart | carts_30d |
| revenue | log(1 + rfm_monetary): lifetime spend (no windowed revenue in the row), logged (it is not capped) |
| open_rate | none yet (no message feature in the row): every visitor counts as new |

No row (a visitor never seen, or one whose row may not be read without consent) means no pre-period: the
visitor counts as new (covariate 0 plus the new-visitor indicator), never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

# metric -> the visitor feature whose value is the metric's pre-period value (or a predictor of it).
COUNT_COVARIATES: Final = {
    "conversion": "purchases_30d",
    "add_to_cart": "carts_30d",
}
# Revenue is capped at a pooled quantile in the report but its covariate is not (docs/statistics.md, section 7):
# a heavy-tailed covariate would let a few big spenders steer θ, so the predictor is log(1 + lifetime spend).
REVENUE_FEATURE: Final = "rfm_monetary"
CTR_CLICKS: Final = "rec_clicks_7d"
CTR_IMPRESSIONS: Final = "rec_impressions_7d"


def _value(row: Mapping[str, Any], name: str) -> float | None:
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def exposure_covariates(row: Mapping[str, Any] | None) -> dict[str, float] | None:
    """metric -> pre-exposure value from the request's visitor row; None without a row (a new visitor)."""
    if not row:
        return None
    covariates: dict[str, float] = {}
    for metric, feature in COUNT_COVARIATES.items():
        value = _value(row, feature)
        if value is not None:
            covariates[metric] = value
    spend = _value(row, REVENUE_FEATURE)
    if spend is not None:
        covariates["revenue"] = math.log1p(spend)
    impressions, clicks = _value(row, CTR_IMPRESSIONS), _value(row, CTR_CLICKS)
    if impressions and clicks is not None:
        covariates["ctr"] = clicks / impressions
    return covariates or None
