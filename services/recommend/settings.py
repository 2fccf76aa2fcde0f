"""Recommend service settings (env prefix RECOMMEND_; shared values come from SELARAS_* / REDIS_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings
from services.recommend.ranking.candidates import SOURCES, CandidateCount
from services.recommend.ranking.exploration import Exploration


class RecommendSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="RECOMMEND_", extra="ignore", populate_by_name=True)
    # The language of explanations when a request's `context.locale` names none we have: "en" or "id".
    default_locale: Literal["en", "id"] = "en"

    # A page view must not wait on a struggling Redis: fail fast and answer from the in-process caches.
    redis_timeout_s: float = Field(default=0.25, gt=0, le=30, validation_alias="SELARAS_REDIS_TIMEOUT_S")
    # A stalled (not dead) Redis holds each read until the socket timeout. The visitor's stored inputs are read
    # off the event loop and waited for at most `store_budget_s`; after `breaker_failures` failed reads in a row
    # the reads are skipped (fallback ranking at once) for `breaker_reset_s`, then one trial read decides
    # (services/common/breaker.py).
    store_budget_s: float = Field(default=0.15, gt=0, le=5)
    store_io_threads: int = Field(default=8, ge=1, le=64)
    breaker_failures: int = Field(default=3, ge=1, le=100)
    breaker_reset_s: float = Field(default=1.0, gt=0, le=60)
    # Candidates served per request (services/recommend/ranking/candidates.py CandidateCount): at least
    # `max_candidates`, `candidate_share` of the catalogue's products on large catalogues, at most
    # `candidate_limit` (share 0: always `max_candidates`).
    max_candidates: int = Field(default=500, ge=10, le=5000)
    candidate_share: float = Field(default=0.08, ge=0, le=1)
    candidate_limit: int = Field(default=1500, ge=10, le=5000)
    # Candidates pooled from the generators before the best `max_candidates` by fused score are kept
    # (services/recommend/ranking/candidates.py); 0: fixed per-generator budgets in priority order.
    candidate_pool: int = Field(default=0, ge=0, le=20000)
    # Candidate generators in use (all by default; fewer for ablations, see docs/quality.md).
    candidate_sources: tuple[str, ...] = SOURCES
    max_slots: int = Field(default=10, ge=1, le=50)
    max_count: int = Field(default=100, ge=1, le=500)
    max_per_category: int = Field(default=4, ge=1)
    # Merchandiser pins that jump to the top of a slot (the best-scored ones); more pins compete on score.
    max_pinned_per_slot: int = Field(default=1, ge=0, le=100)
    # How often the in-process item cache (catalog, item stats, indexes) is rebuilt in the background.
    refresh_interval_s: float = Field(default=10.0, gt=0)
    # Between full reads a refresh re-reads only the items whose statistics changed (common/item_changes.py).
    item_stats_full_read_s: float = Field(default=600.0, gt=0)
    log_impressions: bool = True
    recommendation_ttl_s: int = Field(default=7 * 86400, ge=60)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_catalog_batch: int = Field(default=5000, ge=1)
    experiments_file: Path = Field(default=Path(__file__).resolve().parents[2] / "experiments.yaml")
    # Threads for CPU work off the event loop (next-best-message batches; ranking too when the flag below is
    # off); more than the cores only adds GIL contention.
    ranking_threads: int = Field(default=2, ge=1, le=64)
    # Rank /v1/recommend on the event loop: measured at 200 req/s on 2 cores, p50 10.4 -> 7.1 ms, p99 62 -> 42 ms
    # and 12% less CPU per request than handing each request to a thread (bench/results.md).
    rank_on_event_loop: bool = True
    # Benchmark baseline only: fetch candidate item features through the Feast SDK per request.
    naive_item_features: bool = False
    # Exploration with logged propensities, per slot name or slot kind ("*" = every slot); off by default and
    # never set by a request. E.g. RECOMMEND_EXPLORATION='{"product": {"mode": "softmax", "temperature": 0.5}}'.
    exploration: dict[str, Exploration] = Field(default_factory=dict)
    # Seed of the exploration draws (None = fresh entropy; set it for reproducible simulations).
    exploration_seed: int | None = None
    # The demo shop front at /demo-shop/ (services/demo_shop/): off except in `selaras demo`. Its pages carry
    # `demo_shop_key`, a public browser key (recommend+collect; the service refuses to start with a server key
    # there), and send events to the profile service at `demo_shop_profile_url`, which must list this
    # service's origin in SELARAS_CORS_ORIGINS. The SDK files come from `sdk_dir` (the repository's sdk/js).
    demo_shop: bool = False
    demo_shop_key: str = ""
    demo_shop_profile_url: str = "http://127.0.0.1:8001"
    sdk_dir: Path = Field(default=Path(__file__).resolve().parents[2] / "sdk" / "js")

    def candidate_count(self) -> CandidateCount:
        return CandidateCount(self.max_candidates, self.candidate_share, max(self.candidate_limit, self.max_candidates))
