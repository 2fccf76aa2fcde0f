"""Settings shared by both services. Each service extends `CommonSettings` with its own env prefix.

Shared values are read from `SELARAS_*` (and `REDIS_URL`), so one environment configures both services.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.consent import ConsentDefaults
from services.common.traits import TraitSchema

PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "dev", "test", "password"})


def shared(name: str, *aliases: str) -> AliasChoices:
    """Accept `SELARAS_<NAME>` (and the given plain aliases) for a shared setting."""
    return AliasChoices(f"SELARAS_{name.upper()}", *aliases)


def _segment_alias(name: str) -> AliasChoices:
    """SELARAS_<NAME>, the PROFILE_<NAME> these had when only the profile service read them, or the field name."""
    return AliasChoices(f"SELARAS_{name.upper()}", f"PROFILE_{name.upper()}", name)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    environment: Literal["development", "test", "production"] = Field(
        default="development", validation_alias=shared("environment")
    )
    data_dir: Path = Field(default=Path("data"), validation_alias=shared("data_dir"))
    # Set REDIS_URL to use Redis for the event log, state and the Feast online store; unset = embedded SQLite.
    redis_url: str | None = Field(default=None, validation_alias=shared("redis_url", "REDIS_URL"))
    redis_cluster: bool = Field(default=False, validation_alias=shared("redis_cluster"))
    # Key prefix in Redis: lets several shops (or test runs) share one Redis safely.
    namespace: str = Field(default="selaras", pattern=r"^[a-z][a-z0-9_]{0,30}$", validation_alias=shared("namespace"))
    feast_project: str = Field(
        default="selaras", pattern=r"^[a-z][a-z0-9_]{0,40}$", validation_alias=shared("feast_project")
    )
    feature_repo: Path = Field(
        default=Path(__file__).resolve().parents[2] / "feature_repo", validation_alias=shared("feature_repo")
    )
    # "name:scope+scope:sha256-of-key" entries, comma separated. Empty = no auth (development only).
    api_keys: str = Field(default="", validation_alias=shared("api_keys"))
    log_level: str = Field(default="INFO", validation_alias=shared("log_level"))
    # Consent when a visitor said nothing: "opt_out" = allowed until refused, "opt_in" = refused until given.
    consent_personalization: Literal["opt_in", "opt_out"] = Field(
        default="opt_out", validation_alias=shared("consent_personalization")
    )
    consent_analytics: Literal["opt_in", "opt_out"] = Field(
        default="opt_out", validation_alias=shared("consent_analytics")
    )
    consent_marketing: Literal["opt_in", "opt_out"] = Field(
        default="opt_in", validation_alias=shared("consent_marketing")
    )
    # Segment rules (lifecycle thresholds in days, RFM value tiers in IDR): shared, so the profile service,
    # message replay, training and evaluation segment visitors the same way. PROFILE_* names still work.
    active_within_days: float = Field(default=14.0, gt=0, validation_alias=_segment_alias("active_within_days"))
    at_risk_after_days: float = Field(default=30.0, gt=0, validation_alias=_segment_alias("at_risk_after_days"))
    dormant_after_days: float = Field(default=60.0, gt=0, validation_alias=_segment_alias("dormant_after_days"))
    new_within_days: float = Field(default=7.0, gt=0, validation_alias=_segment_alias("new_within_days"))
    loyal_min_purchases: int = Field(default=3, ge=1, validation_alias=_segment_alias("loyal_min_purchases"))
    value_tier_mid_idr: float = Field(default=500_000.0, ge=0, validation_alias=_segment_alias("value_tier_mid_idr"))
    value_tier_high_idr: float = Field(
        default=3_000_000.0, ge=0, validation_alias=_segment_alias("value_tier_high_idr")
    )
    redis_timeout_s: float = Field(default=2.0, gt=0, le=30, validation_alias=shared("redis_timeout_s"))
    # Partitions of the event log in Redis (by a stable hash of visitor_id): each is folded by one aggregator
    # process at a time, so up to this many aggregator processes fold in parallel. Changing it moves visitors
    # between partitions: change it only while the log is folded to its end. The embedded store keeps one.
    log_partitions: int = Field(default=4, ge=1, le=64, validation_alias=shared("log_partitions"))
    # The hot window: the store (Redis) keeps folded events this long, and event ids (idempotency) as long;
    # older folded events are archived to parquet under the offline store (docs/data-path.md).
    hot_window_days: float = Field(default=7.0, gt=0, le=400, validation_alias=shared("hot_window_days"))
    # HTTP hardening (services/common/security.py). Browser origins allowed by CORS, comma separated
    # ("*" = any); empty = no CORS headers, so browsers refuse cross-origin calls.
    cors_origins: str = Field(default="", validation_alias=shared("cors_origins"))
    # Bodies above this get 413 before the app reads them (routes may set lower limits of their own).
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, validation_alias=shared("max_request_bytes"))
    # The body limit for requests that do not carry a server key (browser keys, no or unknown key): checked
    # before the body is read, so a holder of the public key cannot make the service buffer 16 MiB per request.
    max_browser_request_bytes: int = Field(
        default=256 * 1024, ge=1024, validation_alias=shared("max_browser_request_bytes")
    )
    # Per-API-key token buckets: sustained requests/s and burst. 0 = no default limit. Without API keys
    # (development) requests are not limited unless SELARAS_RATE_LIMITS names "anonymous".
    rate_limit_per_s: float = Field(default=1000.0, ge=0, validation_alias=shared("rate_limit_per_s"))
    rate_limit_burst: int = Field(default=2000, ge=1, validation_alias=shared("rate_limit_burst"))
    # Per-key overrides: "key-name=rate/burst,other=rate/burst" ("unauthenticated", "anonymous" also work).
    rate_limits: str = Field(default="", validation_alias=shared("rate_limits"))
    # Where buckets live: "auto" = Redis when REDIS_URL is set (replicas share limits), else in-process.
    rate_limit_backend: Literal["auto", "redis", "memory"] = Field(
        default="auto", validation_alias=shared("rate_limit_backend")
    )

    # Business time (services/common/clock.py). Unset = wall time. An ISO moment starts the service clock
    # there, running at wall speed: a replay of history through the live services.
    clock_start: datetime | None = Field(default=None, validation_alias=shared("clock_start"))
    # A simulation deployment honours a request's own `now` from any key (otherwise only admin keys may).
    simulation: bool = Field(default=False, validation_alias=shared("simulation"))
    # Events more than this far ahead of the clock are refused (ingest 422, import invalid line) and
    # never move an item's or visitor's time forward by more than this when folded.
    max_clock_skew_s: float = Field(default=300.0, ge=0, le=86_400, validation_alias=shared("max_clock_skew_s"))
    # Declared customer attributes (services/common/traits.py): JSON, or the path of a JSON/YAML file. Empty =
    # no schema: `profile_update` properties are stored unchecked and no model reads them.
    traits: str = Field(default="", validation_alias=shared("traits"))

    @field_validator("redis_url")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _production_needs_keys(self) -> CommonSettings:
        if self.environment == "production":
            if not self.api_keys.strip():
                raise ValueError("SELARAS_API_KEYS must be set in production (see README: API keys)")
            for entry in self.api_keys.split(","):
                if entry.strip().rsplit(":", 1)[-1].lower() in PLACEHOLDER_SECRETS:
                    raise ValueError("SELARAS_API_KEYS holds a placeholder secret; set real key hashes")
        return self

    @field_validator("clock_start")
    @classmethod
    def _aware_clock_start(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("SELARAS_CLOCK_START needs a time zone, e.g. 2014-06-01T00:00:00+00:00")
        return value

    @field_validator("traits")
    @classmethod
    def _readable_traits(cls, value: str) -> str:
        TraitSchema.parse(value)  # a bad schema stops the service at start, naming what is wrong
        return value

    def trait_schema(self) -> TraitSchema:
        return TraitSchema.parse(self.traits)

    def consent_defaults(self) -> ConsentDefaults:
        return ConsentDefaults(self.consent_personalization, self.consent_analytics, self.consent_marketing)

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: SQLite holds the log, state and online features."""
        return self.redis_url is None

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "selaras.db"

    @property
    def offline_dir(self) -> Path:
        return self.data_dir / "offline"
