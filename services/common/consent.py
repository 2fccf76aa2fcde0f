"""Consent per visitor and purpose. Defaults are configurable: opt-in (refused until given) or opt-out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import orjson

PURPOSES: Final = ("personalization", "analytics", "marketing_push", "marketing_email", "marketing_whatsapp")
DefaultMode = Literal["opt_in", "opt_out"]


@dataclass(frozen=True)
class ConsentDefaults:
    personalization: DefaultMode = "opt_out"
    analytics: DefaultMode = "opt_out"
    marketing: DefaultMode = "opt_in"

    def default_for(self, purpose: str) -> bool:
        if purpose.startswith("marketing_"):
            return self.marketing == "opt_out"
        return getattr(self, purpose) == "opt_out"


@dataclass(frozen=True)
class Consent:
    """What the visitor said explicitly (`given`), resolved against the defaults."""

    given: Mapping[str, bool] = field(default_factory=dict)
    updated_at: float = 0.0

    def allows(self, purpose: str, defaults: ConsentDefaults) -> bool:
        if purpose in self.given:
            return self.given[purpose]
        return defaults.default_for(purpose)

    def resolved(self, defaults: ConsentDefaults) -> dict[str, bool]:
        return {p: self.allows(p, defaults) for p in PURPOSES}

    def merged(self, changes: Mapping[str, bool], at: float) -> Consent:
        return Consent({**self.given, **changes}, at)

    def to_bytes(self) -> bytes:
        return orjson.dumps({"given": dict(self.given), "updated_at": self.updated_at})

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Consent:
        if not raw:
            return cls()
        data = orjson.loads(raw)
        return cls(dict(data.get("given", {})), float(data.get("updated_at", 0.0)))


def consent_changes_from_properties(properties: Mapping[str, object]) -> dict[str, bool]:
    """`profile_update` events carry consent as properties `consent_<purpose>: true|false`."""
    changes: dict[str, bool] = {}
    for purpose in PURPOSES:
        value = properties.get(f"consent_{purpose}")
        if isinstance(value, bool):
            changes[purpose] = value
    return changes
