"""The declared trait schema: how it is read from settings, which values it refuses, and the model columns."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.common.settings import CommonSettings
from services.common.traits import TraitSchema

SCHEMA = {
    "traits": [
        {"name": "newbie", "type": "boolean"},
        {"name": "spend_12m", "type": "number"},
        {"name": "channel", "type": "category", "values": ["web", "phone", "multichannel"]},
        {"name": "signup_date", "type": "date"},
    ]
}
NOW = datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()


def test_schema_from_json_text_a_yaml_file_or_a_bare_list(tmp_path: Path) -> None:
    from_json = TraitSchema.parse(json.dumps(SCHEMA))
    path = tmp_path / "traits.yaml"
    path.write_text(
        "traits:\n"
        "  - {name: newbie, type: boolean}\n"
        "  - {name: spend_12m, type: number}\n"
        "  - {name: channel, type: category, values: [web, phone, multichannel]}\n"
        "  - {name: signup_date, type: date}\n"
    )
    assert TraitSchema.parse(str(path)) == from_json
    assert TraitSchema.parse(json.dumps(SCHEMA["traits"])) == from_json
    assert from_json.columns == ("t_newbie", "t_spend_12m", "t_channel", "t_signup_date")
    assert from_json.categorical_columns == ("t_channel",)
    assert TraitSchema.parse("") == TraitSchema()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[{"name": "tier", "type": "category"}]', "needs its allowed values"),
        ('[{"name": "tier", "type": "colour"}]', "traits.0.type"),
        ('[{"name": "a", "type": "number"}, {"name": "a", "type": "date"}]', "repeat"),
        ('[{"name": "first_name", "type": "category", "values": ["x"]}]', "reserved"),
        ('[{"name": "n", "type": "number", "values": ["x"]}]', "only categories"),
        ("/no/such/file.yaml", "neither JSON nor a file"),
        ("{not json", "not readable"),
    ],
)
def test_a_bad_schema_is_refused_when_settings_load(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        CommonSettings(traits=text)


def test_settings_read_the_schema_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELARAS_TRAITS", json.dumps(SCHEMA))
    assert CommonSettings().trait_schema() == TraitSchema.parse(json.dumps(SCHEMA))


def test_values_are_checked_by_type_and_unknown_traits_are_named() -> None:
    schema = TraitSchema.parse(json.dumps(SCHEMA))
    good = {
        "newbie": True,
        "spend_12m": 120.5,
        "channel": "phone",
        "signup_date": "2025-01-31",
        "first_name": "Sari",  # reserved profile properties are always accepted
        "consent_marketing_email": True,
        "spend_12m_extra": None,
    }
    errors = dict(schema.errors(good))
    assert list(errors) == ["spend_12m_extra"] and "not a declared trait" in errors["spend_12m_extra"]
    bad = {"newbie": "yes", "spend_12m": True, "channel": "fax", "signup_date": "31/01/2025"}
    assert [name for name, _ in schema.errors(bad)] == ["newbie", "spend_12m", "channel", "signup_date"]
    assert schema.errors({"signup_date": "2025-01-31T10:00:00"}) != []  # a time needs its zone
    assert schema.errors({"signup_date": "2025-01-31T10:00:00+07:00", "newbie": None}) == []
    assert TraitSchema().errors({"anything": [1]}) == []  # without a schema nothing is checked


def test_model_columns_missing_is_nan_categories_by_code_dates_as_days_since() -> None:
    schema = TraitSchema.parse(json.dumps(SCHEMA))
    row = schema.vector({"newbie": False, "spend_12m": 3, "channel": "multichannel", "signup_date": "2026-11-16"}, NOW)
    assert row == [0.0, 3.0, 3.0, 10.5]
    missing = schema.vector({"channel": "fax", "spend_12m": "12"}, NOW)  # stored before a schema change
    assert all(math.isnan(v) for v in missing)
