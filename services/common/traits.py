"""Customer attributes (CRM traits) a shop declares: the schema, the check of a value, and a trait as a number.

A shop declares its traits once (`SELARAS_TRAITS`, JSON or the path of a JSON/YAML file; see docs/messages.md):

    {"traits": [{"name": "newbie", "type": "boolean"},
                {"name": "spend_12m", "type": "number"},
                {"name": "channel", "type": "category", "values": ["web", "phone", "multichannel"]},
                {"name": "signup_date", "type": "date"}]}

Values arrive as `profile_update` properties (the API, `selaras import events`) or as columns of
`selaras import customers`. With a schema declared, a property that is neither a declared trait nor a
profile property the services read themselves (`RESERVED`, `consent_*`) is refused, and so is a value of the
wrong type: the API answers 422 naming `properties.<trait>`, imports name the line. A value stored in the
visitor state is therefore already typed: a number, a boolean, one of the declared category values, or an
ISO date; `null` clears a trait.

Models read a trait as one column `t_<name>`: numbers as they are, booleans 1/0, categories as the 1-based
position of the value in the declared list (a fixed code table, stored with the model, so LightGBM
categoricals mean the same in training and serving), dates as days since the date at decision time. A missing
or unreadable value is NaN (LightGBM's "missing").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TraitType = Literal["number", "category", "boolean", "date"]
DAY: Final = 86_400.0
# Profile properties other code reads by name (rendering, time zone, locale): always accepted.
RESERVED: Final = frozenset({"first_name", "last_name", "city", "locale"})
CONSENT_PREFIX: Final = "consent_"
COLUMN_PREFIX: Final = "t_"


class TraitSpec(BaseModel):
    """One declared trait. `values`: the allowed values of a category, in code order (1, 2, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")
    type: TraitType
    values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _values_for_categories_only(self) -> TraitSpec:
        if self.type == "category":
            if not self.values:
                raise ValueError(f"trait {self.name}: a category needs its allowed values")
            if len(set(self.values)) != len(self.values):
                raise ValueError(f"trait {self.name}: category values repeat")
        elif self.values:
            raise ValueError(f"trait {self.name}: only categories list values")
        if self.name in RESERVED or self.name.startswith(CONSENT_PREFIX):
            raise ValueError(f"trait {self.name}: the name is a reserved profile property")
        return self

    def error(self, value: Any) -> str | None:
        """Why `value` is not a valid value of this trait, or None (None itself clears the trait)."""
        if value is None:
            return None
        if self.type == "number":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return f"{self.name} is a number, got {value!r}"
        elif self.type == "boolean":
            if not isinstance(value, bool):
                return f"{self.name} is true or false, got {value!r}"
        elif self.type == "category":
            if value not in self.values:
                return f"{self.name} must be one of {', '.join(self.values)}; got {value!r}"
        elif parse_date(value) is None:
            return f"{self.name} is a date (YYYY-MM-DD or an ISO time with a zone), got {value!r}"
        return None

    def number(self, value: Any, now: float) -> float:
        """The trait as a model input (NaN when missing or not a valid value, e.g. after a schema change)."""
        if value is None or self.error(value) is not None:
            return math.nan
        if self.type == "number":
            return float(value)
        if self.type == "boolean":
            return 1.0 if value else 0.0
        if self.type == "category":
            return float(self.values.index(value) + 1)
        moment = parse_date(value)
        return math.nan if moment is None else (now - moment) / DAY


def parse_date(value: Any) -> float | None:
    """Unix seconds of an ISO date (midnight UTC) or of an ISO time with a zone; None when it is neither."""
    if not isinstance(value, str):
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


class TraitSchema(BaseModel):
    """The declared traits (empty: no schema, properties of `profile_update` are not checked)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    traits: tuple[TraitSpec, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> TraitSchema:
        names = [t.name for t in self.traits]
        if len(set(names)) != len(names):
            raise ValueError("trait names repeat")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(COLUMN_PREFIX + t.name for t in self.traits)

    @property
    def categorical_columns(self) -> tuple[str, ...]:
        return tuple(COLUMN_PREFIX + t.name for t in self.traits if t.type == "category")

    def spec(self, name: str) -> TraitSpec | None:
        return next((t for t in self.traits if t.name == name), None)

    def errors(self, properties: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(property name, message) for every property the schema refuses; nothing when no schema is declared."""
        if not self.traits:
            return []
        out: list[tuple[str, str]] = []
        for name, value in properties.items():
            if name in RESERVED or name.startswith(CONSENT_PREFIX):
                continue
            spec = self.spec(name)
            if spec is None:
                declared = ", ".join(t.name for t in self.traits)
                out.append((name, f"{name} is not a declared trait (declared: {declared})"))
                continue
            message = spec.error(value)
            if message is not None:
                out.append((name, message))
        return out

    def vector(self, traits: Mapping[str, Any], now: float) -> list[float]:
        """The trait columns of one visitor at decision time `now`."""
        return [t.number(traits.get(t.name), now) for t in self.traits]

    @classmethod
    def parse(cls, text: str) -> TraitSchema:
        """From JSON text, or from the path of a .json/.yaml/.yml file. Raises ValueError saying what is wrong."""
        text = text.strip()
        if not text:
            return cls()
        if text[0] in "[{":
            source, raw = "SELARAS_TRAITS", text
        else:
            path = Path(text)
            if not path.is_file():
                raise ValueError(f"SELARAS_TRAITS: {text} is neither JSON nor a file")
            source, raw = str(path), path.read_text(encoding="utf-8")
        try:
            if source.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(raw)
            else:
                data = json.loads(raw)
        except Exception as exc:  # json's ValueError, yaml.YAMLError: both mean the text is not readable
            raise ValueError(f"{source}: not readable: {exc}") from exc
        if isinstance(data, list):
            data = {"traits": data}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{source}: {where}: {first['msg']}") from exc
