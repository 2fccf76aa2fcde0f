"""Erasure, export and retention over the archive and the hot window (real Redis and SQLite, real Feast):
part of a visitor's history archived, part still hot; export returns all of it once and in order, erasure
removes it from both and rewrites only the archive files that held the visitor."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from services.common.storage.archiver import archive_log
from services.features.aggregations import SegmentRules
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.privacy.repository import PrivacyRepository
from services.profile.privacy.service import PrivacyService
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from tests.conftest import REDIS_URL
from tests.factories import BASE_TIME, make_item
from tests.profile.test_privacy import history


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_erasure_and_export_cover_archive_and_hot_window(settings_factory: Callable[..., Any], backend: str) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings, redis_url=REDIS_URL if backend == "redis" else None)
    repository = ProfileRepository.open(settings)
    store = repository.store
    try:
        assert store.archive is not None
        repository.upsert_catalog([make_item(item_id="pv-1"), make_item(item_id="pv-2")])
        aggregator = Aggregator(repository, SegmentRules(), settings.consent_defaults())
        ingest = IngestService(repository)
        others = [f"other-{n}" for n in range(12)]
        whole = history("erase-me", BASE_TIME, days=3)
        old, recent = whole[:8], whole[8:]
        ingest.ingest(old + [e for v in others for e in history(v, BASE_TIME, days=2)])
        while aggregator.run_once(5000).events:
            pass
        archived = archive_log(store, store.archive, store.log_time() + 1, 0.0, "test")
        assert archived.archived == 8 * 13 and store.log_length() == 0
        files_before = {f.path: f.path.stat().st_mtime_ns for f in store.archive.files()}
        ingest.ingest(recent + history("keep-me", BASE_TIME + timedelta(days=2), days=1))
        while aggregator.run_once(5000).events:
            pass
        privacy = PrivacyService(
            PrivacyRepository(store, repository.feature_store, settings.offline_dir), settings.consent_defaults()
        )

        exported = privacy.export("erase-me")["events"]
        assert [e["event_id"] for e in exported] == [e.event_id for e in old + recent]

        receipt = privacy.erase("erase-me")
        assert (receipt.archived_events, receipt.log_events) == (len(old), len(recent))
        assert receipt.idempotency_keys == len(old) + len(recent)
        # Only the files of the visitor's partition that held its rows were rewritten.
        changed = [p for p, mtime in files_before.items() if p.stat().st_mtime_ns != mtime]
        assert len(changed) == receipt.archive_files_rewritten >= 1
        partition = f"partition={store.partition_of('erase-me')}"
        assert all(p.parent.name == partition for p in changed)
        assert privacy.export("erase-me")["events"] == []
        remaining = [e for e in store.iter_log()]
        assert len(remaining) == 8 * 12 + 4 and not any(b'"erase-me"' in e.payload for e in remaining)
        assert len(privacy.export("other-3")["events"]) == 8
    finally:
        repository.close()


def test_retention_reaches_the_archive(settings_factory: Callable[..., Any]) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings)
    repository = ProfileRepository.open(settings)
    store = repository.store
    try:
        assert store.archive is not None
        aggregator = Aggregator(repository, SegmentRules(), settings.consent_defaults())
        ingest = IngestService(repository)
        ingest.ingest(history("old", BASE_TIME - timedelta(days=500), days=2) + history("new", BASE_TIME, days=2))
        while aggregator.run_once(5000).events:
            pass
        archive_log(store, store.archive, store.log_time() + 1, 0.0, "test")
        privacy = PrivacyService(
            PrivacyRepository(store, repository.feature_store, settings.offline_dir), settings.consent_defaults()
        )
        cutoff_days = (BASE_TIME.timestamp() - (BASE_TIME - timedelta(days=100)).timestamp()) / 86400
        now = BASE_TIME.timestamp()
        dry = privacy.apply_retention(cutoff_days, now=now, dry_run=True)
        assert dry.archived_events == 8 and store.archive.count() == 16
        report = privacy.apply_retention(cutoff_days, now=now)
        assert report.archived_events == 8 and store.archive.count() == 8
        assert {e.position for e in store.iter_log()} == {
            e.position for e in store.archive.visitor_entries(store.partition_of("new"), "new")
        }
    finally:
        repository.close()
