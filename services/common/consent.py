"""Consent per visitor and purpose. Defaults are configurable: opt-in (refused until given) or opt-out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    """What the visitor said explicitly (`given`), resolved against the defaults.

    Every purpose carries the time of its choice (`at`, business time): records are merged purpose by purpose,
    the later choice wins, so the order in which writers (the consent API, the aggregator folding
    `profile_update` events, erasure) store their copies does not matter, and a late event dated before a newer
    explicit choice never overrides it. On equal times refusal wins (the privacy-safe side). Records written
    before per-purpose times existed date every choice at their `updated_at`."""

    given: Mapping[str, bool] = field(default_factory=dict)
    updated_at: float = 0.0
    at: Mapping[str, float] = field(default_factory=dict)

    def allows(self, purpose: str, defaults: ConsentDefaults) -> bool:
        if purpose in self.given:
            return self.given[purpose]
        return defaults.default_for(purpose)

    def resolved(self, defaults: ConsentDefaults) -> dict[str, bool]:
        return {p: self.allows(p, defaults) for p in PURPOSES}

    def time_of(self, purpose: str) -> float:
        return self.at.get(purpose, self.updated_at)

    def merged(self, changes: Mapping[str, bool], at: float) -> Consent:
        """This record with `changes` decided at time `at` (a purpose with a newer choice keeps it)."""
        return self.combined(Consent(dict(changes), at, dict.fromkeys(changes, at)))

    def combined(self, other: Consent) -> Consent:
        """Both records merged purpose by purpose: the later choice wins, refusal on a tie. Commutative,
        associative and idempotent, so concurrent writers converge whatever the order of their writes."""
        given = dict(self.given)
        times = {p: self.time_of(p) for p in given}
        for purpose, value in other.given.items():
            t = other.time_of(purpose)
            if purpose not in given or t > times[purpose] or (t == times[purpose] and not value):
                given[purpose], times[purpose] = value, t
        return Consent(given, max(times.values(), default=0.0), times)

    def to_bytes(self) -> bytes:
        at = {p: self.time_of(p) for p in self.given}
        return orjson.dumps({"given": dict(self.given), "updated_at": self.updated_at, "at": at})

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Consent:
        if not raw:
            return cls()
        data = orjson.loads(raw)
        given = dict(data.get("given", {}))
        updated_at = float(data.get("updated_at", 0.0))
        at = {p: float(t) for p, t in data.get("at", {}).items() if p in given}
        return cls(given, updated_at, {p: at.get(p, updated_at) for p in given})


def merge_into(consent: Consent) -> Callable[[bytes | None], bytes]:
    """A compare-and-set update (`Store.update`) that merges `consent` into the stored record."""

    def merge(current: bytes | None) -> bytes:
        return Consent.from_bytes(current).combined(consent).to_bytes()

    return merge


def refusing_all(at: float) -> Consent:
    """Every purpose refused at `at`: the tombstone erasure leaves (proof of the request, and the next visit
    does not rebuild a profile)."""
    return Consent(dict.fromkeys(PURPOSES, False), at, dict.fromkeys(PURPOSES, at))


def consent_changes_from_properties(properties: Mapping[str, object]) -> dict[str, bool]:
    """`profile_update` events carry consent as properties `consent_<purpose>: true|false`."""
    changes: dict[str, bool] = {}
    for purpose in PURPOSES:
        value = properties.get(f"consent_{purpose}")
        if isinstance(value, bool):
            changes[purpose] = value
    return changes
