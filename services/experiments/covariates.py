"""CUPED covariates at serve time: the visitor's pre-exposure value of each metric, from the visitor row the
request already read (pure).

The recommend and message services pass `exposure_covariates(row)` to the runtime's `record_exposure`; the store
keeps them from the visitor's first exposure only (frozen, like the persona), so later requests cannot leak
treatment effects into the covariate. The row must be the point-in-time row of the request
(`services.common.features.visitor_row_at(row, now)`), so windows that ended before the request read 0.

Which feature stands for which metric (docs/statistics.md, "Serving covariates"):

| metric | covariate |
|---|---|
| ctr | rec_clicks_7d / rec_impressions_7d (no recommendation seen in 7 days: no pre-period) |
| conversion | purchases_30d |
| add_to_cart | carts_30d |
| revenue | rfm_monetary (lifetime spend: the row has no windowed revenue) |
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
    "revenue": "rfm_monetary",
}
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
    impressions, clicks = _value(row, CTR_IMPRESSIONS), _value(row, CTR_CLICKS)
    if impressions and clicks is not None:
        covariates["ctr"] = clicks / impressions
    return covariates or None
