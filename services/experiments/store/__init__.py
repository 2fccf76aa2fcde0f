"""The experiment store: the only part of services/experiments that talks to Redis or SQLite.

`base` holds the records and the interface, `sums` the layout of the stored sums (pure), `redis_store` and
`sqlite_store` the two backends; `open_experiment_store` picks one from the settings.
"""

from __future__ import annotations

from services.common.settings import CommonSettings
from services.common.storage import event_dedupe_ttl_s, make_redis_client
from services.experiments.store.base import ExperimentStore
from services.experiments.store.redis_store import RedisExperimentStore
from services.experiments.store.sqlite_store import SqliteExperimentStore


def open_experiment_store(settings: CommonSettings) -> ExperimentStore:
    """Redis when REDIS_URL is set (Lua scripts), the embedded SQLite file otherwise. Counted outcome events
    are remembered as long as the log remembers event ids (the hot window): within it a re-sent event never
    reaches the log again, and what this dedupe catches (a log entry read or applied again) happens within it;
    an event the log accepts again after it is a new event for every fold, this one included."""
    dedupe_ttl_s = event_dedupe_ttl_s(settings)
    if settings.redis_url:
        client = make_redis_client(settings.redis_url, settings.redis_cluster, settings.redis_timeout_s)
        return RedisExperimentStore(client, settings.namespace, dedupe_ttl_s)
    settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteExperimentStore(settings.sqlite_path, dedupe_ttl_s)
