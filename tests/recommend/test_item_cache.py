"""The item cache re-reads only the statistics rows that changed, and sees every change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from services.common.clock import FixedClock
from services.features.aggregations import SegmentRules
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.recommend.repository import RecommendRepository
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from tests.factories import BASE_TIME, make_event, make_item


def views(item_id: str, n: int) -> list[Any]:
    return [make_event(visitor_id=f"v{i}", item_id=item_id) for i in range(n)]


def test_a_refresh_reads_only_changed_items_and_sees_their_new_statistics(
    settings_factory: Callable[..., Any],
) -> None:
    settings: RecommendSettings = settings_factory(RecommendSettings)
    catalog = [make_item(item_id=f"p{i}") for i in range(30)]
    profile = ProfileRepository.open(settings)
    recommend = RecommendRepository.open(settings)
    try:
        profile.upsert_catalog(catalog)
        aggregator = Aggregator(
            profile, SegmentRules(), settings.consent_defaults(), offline_rows=False, clock=FixedClock(BASE_TIME)
        )

        def ingest(events: list[Any]) -> None:
            IngestService(profile).ingest(events)
            while aggregator.run_once(1000).events:
                pass

        requested: list[list[str]] = []
        read_rows = recommend.item_stats

        def recording_item_stats(item_ids: Sequence[str], chunk: int = 1000) -> dict[str, dict[str, Any]]:
            requested.append(list(item_ids))
            return read_rows(item_ids, chunk)

        recommend.item_stats = recording_item_stats  # type: ignore[method-assign]
        service = RecommendService(settings, recommend)

        def views_7d(item_id: str) -> float:
            snapshot = service.snapshot
            return float(snapshot.stats["views_7d"][snapshot.index[item_id]])

        ingest(views("p1", 3))
        service.refresh_cache()
        assert len(requested[-1]) == 30  # the first refresh reads every product
        assert views_7d("p1") == 3

        ingest(views("p2", 2))
        service.refresh_cache()
        # Only what changed since (the margin re-reads the last few seconds' changes too: p1's).
        assert "p2" in requested[-1] and set(requested[-1]) <= {"p1", "p2"}
        assert views_7d("p2") == 2 and views_7d("p1") == 3  # unchanged rows are kept

        service.refresh_cache()
        assert set(requested[-1]) <= {"p1", "p2"}  # nothing else changed

        profile.upsert_catalog([make_item(item_id="p-new")])  # a catalog change forces a full read
        service.refresh_cache()
        assert len(requested[-1]) == 31 and views_7d("p1") == 3

        # Every `item_stats_full_read_s` the whole set is read again.
        periodic = RecommendService(settings.model_copy(update={"item_stats_full_read_s": 1e-9}), recommend)
        periodic.refresh_cache()
        periodic.refresh_cache()
        assert len(requested[-1]) == 31
    finally:
        recommend.close()
        profile.close()


def test_item_windows_follow_the_clock_not_the_items_last_event(settings_factory: Callable[..., Any]) -> None:
    """A slow seller's "last 7 days" empties as time passes, though no event of its own says so."""
    settings: RecommendSettings = settings_factory(RecommendSettings)
    clock = FixedClock(BASE_TIME + timedelta(minutes=5))
    profile = ProfileRepository.open(settings)
    recommend = RecommendRepository.open(settings)
    try:
        profile.upsert_catalog([make_item(item_id="slow"), make_item(item_id="busy")])
        aggregator = Aggregator(profile, SegmentRules(), settings.consent_defaults(), offline_rows=False, clock=clock)

        def happen(item_id: str, kind: str, n: int) -> None:
            at = clock.now_datetime().isoformat()
            events = [make_event(visitor_id=f"v{i}", item_id=item_id, type=kind, timestamp=at) for i in range(n)]
            IngestService(profile, clock).ingest(events)
            while aggregator.run_once(1000).events:
                pass

        def row(item_id: str) -> dict[str, Any]:
            return recommend.item_stats([item_id])[item_id]

        happen("slow", "product_view", 6)
        happen("slow", "purchase", 4)
        assert (row("slow")["views_24h"], row("slow")["purchases_7d"], row("slow")["purchases_30d"]) == (6, 4, 4)
        clock.advance(3 * 86_400)  # no event for the item: the aggregator's next pass ages its row
        aggregator.run_once(1000)
        assert (row("slow")["views_24h"], row("slow")["views_7d"], row("slow")["purchases_7d"]) == (0, 6, 4)
        clock.advance(10 * 86_400)
        happen("busy", "product_view", 1)
        assert (row("slow")["purchases_7d"], row("slow")["purchases_30d"], row("busy")["views_24h"]) == (0, 4, 1)
        clock.advance(30 * 86_400)
        aggregator.run_once(1000)
        assert (row("slow")["purchases_30d"], row("busy")["views_7d"]) == (0, 0)
        # The serving cache sees the aged rows too.
        service = RecommendService(settings, recommend, clock=clock)
        service.refresh_cache()
        assert service.snapshot.stats["purchases_30d"][service.snapshot.index["slow"]] == 0
    finally:
        profile.close()
        recommend.close()
