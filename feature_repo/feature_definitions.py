"""Selaras feature definitions: entities, push sources, feature views, the context view and the service.

The feature lists live in `services/features/schema.py`; this file turns them into Feast objects, so a
feature is named in one place. `build_definitions(offline_dir)` is what the services apply; the module-level
objects below let the plain `feast` CLI work from this folder too (`SELARAS_DATA_DIR` picks the data dir).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, RequestSource, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, FeastType, Float64, Int64, String

from services.features import schema as F

FEAST_TYPES: dict[str, FeastType] = {
    "int": Int64,
    "float": Float64,
    "str": String,
    "str_list": Array(String),
    "float_list": Array(Float64),
}
VISITOR_TTL = timedelta(days=180)
ITEM_TTL = timedelta(days=30)


def schema(features: dict[str, F.FeatureKind]) -> list[Field]:
    return [Field(name=name, dtype=FEAST_TYPES[kind]) for name, kind in features.items()]


def build_definitions(offline_dir: Path) -> list[Any]:
    """Every Feast object of the repo; offline rows are parquet part files under `offline_dir`."""
    visitor = Entity(
        name=F.VISITOR_ENTITY,
        join_keys=[F.VISITOR_KEY],
        value_type=ValueType.STRING,
        description="A shop visitor (pseudonymous id).",
    )
    item = Entity(
        name=F.ITEM_ENTITY,
        join_keys=[F.ITEM_KEY],
        value_type=ValueType.STRING,
        description="A catalog entry: product, banner, CTA or message.",
    )
    visitor_push = PushSource(
        name="visitor_features_push",
        batch_source=FileSource(
            name="visitor_features_offline",
            path=str(offline_dir / F.VISITOR_VIEW / "*.parquet"),
            timestamp_field=F.TIMESTAMP_FIELD,
        ),
    )
    item_push = PushSource(
        name="item_stats_push",
        batch_source=FileSource(
            name="item_stats_offline",
            path=str(offline_dir / F.ITEM_VIEW / "*.parquet"),
            timestamp_field=F.TIMESTAMP_FIELD,
        ),
    )
    visitor_view = FeatureView(
        name=F.VISITOR_VIEW,
        entities=[visitor],
        ttl=VISITOR_TTL,
        schema=schema(F.VISITOR_FEATURES),
        source=visitor_push,
        online=True,
        description="Real-time behaviour features, written by the profile service.",
    )
    item_view = FeatureView(
        name=F.ITEM_VIEW,
        entities=[item],
        ttl=ITEM_TTL,
        schema=schema(F.ITEM_FEATURES),
        source=item_push,
        online=True,
        description="Item popularity and CTR over windows, written by the profile service.",
    )
    request_context = RequestSource(name="request_context", schema=schema(F.CONTEXT_INPUTS))

    @on_demand_feature_view(
        name=F.CONTEXT_VIEW, sources=[request_context], schema=schema(F.CONTEXT_FEATURES), mode="python"
    )
    def context_features(inputs: dict[str, Any]) -> dict[str, Any]:
        # Rehydrated from source by Feast, so the import lives inside the function.
        from services.common.context import context_features as derive

        rows = [
            derive(float(ts), None if offset is None else int(offset), device, channel, city)
            for ts, offset, device, channel, city in zip(
                inputs["request_ts"],
                inputs["request_utc_offset_min"],
                inputs["request_device"],
                inputs["request_channel"],
                inputs["request_city"],
                strict=True,
            )
        ]
        return {
            name: [row[name] for row in rows]
            for name in (
                "hour",
                "day_of_week",
                "is_weekend",
                "is_payday_window",
                "device_code",
                "channel_code",
            )
        }

    ranker = FeatureService(
        name=F.FEATURE_SERVICE,
        features=[visitor_view, item_view, context_features],
        description="Everything the LightGBM ranker is trained and served with (version 1).",
        tags={"version": "1"},
    )
    return [visitor, item, visitor_push, item_push, visitor_view, item_view, context_features, ranker]


_definitions = build_definitions(Path(os.environ.get("SELARAS_DATA_DIR", "../data")).resolve() / "offline")
(
    visitor_entity,
    item_entity,
    visitor_features_push,
    item_stats_push,
    visitor_features,
    item_stats,
    context_features,
    ranker_v1,
) = _definitions
