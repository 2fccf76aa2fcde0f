"""Profile service settings (env prefix PROFILE_; shared values come from SELARAS_* / REDIS_URL)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class ProfileSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="PROFILE_", extra="ignore", populate_by_name=True)

    max_batch_events: int = Field(default=1000, ge=1, le=10_000)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Aggregator: how many log entries one micro-batch folds at most, and how long it sleeps when idle. Larger
    # batches share each touched item's merge and row among more events (2,000 -> 5,000: +50% events per CPU s).
    aggregator_batch: int = Field(default=5000, ge=1, le=50_000)
    aggregator_idle_s: float = Field(default=0.02, gt=0, le=5)
    # After a batch that was not full (the aggregator has caught up), wait this long before the next: events that
    # arrive meanwhile are folded together. A batch costs ~5 ms beyond its events (commit record, leases, item
    # merges, two parquet part files), so a fold that runs every 20 ms under steady traffic spent more CPU on
    # batches than on events (2,000 events/s: 1.3 cores). Adds at most this much to freshness; 0: fold at once.
    aggregator_linger_s: float = Field(default=0.2, ge=0, le=5)
    # True: the aggregator runs as a thread of the HTTP app (embedded and demo mode). Production runs it as its
    # own process (`selaras run aggregator`) and sets this false so the API scales out on its own.
    aggregator_enabled: bool = True
    # The log's lease: a holder that stops renewing loses it after this long and a standby takes over.
    aggregator_lease_s: float = Field(default=10.0, gt=0.5, le=300)
    # How often the aggregator process archives its partitions' folded events older than the hot window
    # (SELARAS_HOT_WINDOW_DAYS) to the offline store and trims them from the log; 0: never (run `selaras archive`).
    archive_interval_s: float = Field(default=600.0, ge=0, le=86_400)
    # The same run merges the offline feature history's small part files (one per folded batch and view, up to
    # ~5 a second per partition) into files of about this many rows; 0: never (run `selaras compact`).
    compact_target_rows: int = Field(default=10_000, ge=0)
    # Write every event's feature row to the offline store (point-in-time training data).
    offline_rows: bool = True
    # Segment thresholds are shared settings (CommonSettings): every service reads the same ones.
    retention_days: int = Field(default=395, ge=1)
