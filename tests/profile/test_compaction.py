"""Compaction of the offline feature history (services/features/compaction.py, services/profile/compaction.py)
on real folds: many small part files become a few, with the same rows, the same point-in-time answers from
Feast, the same export; erasure still finds the visitor through the index; unsettled files (a batch that may be
folded again) are never merged; a reader holding the read lock makes compaction wait or stop, never lose rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.storage import partition_log
from services.features import schema as F
from services.features.aggregations import SegmentRules
from services.features.compaction import COMPACTED_PREFIX, compact_view, plan_groups
from services.features.store import file_lock, offline_index, offline_parts, offline_read_lock_path
from services.profile.aggregator.archive import PeriodicArchiver
from services.profile.aggregator.worker import Aggregator
from services.profile.compaction import compact_history, settled_parts
from services.profile.ingest import IngestService
from services.profile.privacy.repository import PrivacyRepository
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from services.recommend.repository import RecommendRepository
from tests.factories import BASE_TIME, make_item, make_shop_events

VISITORS = 12


@dataclass
class Folded:
    settings: ProfileSettings
    repository: ProfileRepository
    aggregator: Aggregator

    @property
    def offline_dir(self) -> Path:
        return self.settings.offline_dir.resolve()

    def fold(self, events: Any, batch: int) -> None:
        IngestService(self.repository).ingest(events)
        while self.aggregator.run_once(batch).events:
            pass

    def files(self, view: str) -> list[str]:
        return [p.name for p in offline_parts(self.offline_dir, view)]

    def rows(self, view: str) -> pd.DataFrame:
        """Every row of the view, in a fixed order (the files' order is not part of the data)."""
        table = pa.concat_tables([pq.read_table(p) for p in offline_parts(self.offline_dir, view)])
        frame = table.to_pandas()
        key = F.VISITOR_KEY if view == F.VISITOR_VIEW else F.ITEM_KEY
        return frame.sort_values([key, F.TIMESTAMP_FIELD]).reset_index(drop=True)

    def point_in_time(self) -> pd.DataFrame:
        probes = pd.DataFrame(
            {
                F.VISITOR_KEY: [f"v-{n % VISITORS}" for n in range(40)],
                "event_timestamp": [BASE_TIME + pd.Timedelta(minutes=7 * n + 3) for n in range(40)],
            }
        )
        recommend = RecommendRepository(self.repository.store, self.repository.feature_store, self.offline_dir)
        refs = F.visitor_feature_refs()
        frame = recommend._historical(probes, refs, 100_000)
        return frame.sort_values([F.VISITOR_KEY, "event_timestamp"]).reset_index(drop=True)


@pytest.fixture
def folded(settings_factory: Callable[..., Any]) -> Iterator[Folded]:
    settings: ProfileSettings = settings_factory(ProfileSettings, redis_url=None)
    repository = ProfileRepository.open(settings)
    try:
        repository.upsert_catalog([make_item(item_id=f"i-{n}") for n in range(5)])
        aggregator = Aggregator(repository, SegmentRules(), settings.consent_defaults())
        built = Folded(settings, repository, aggregator)
        built.fold(make_shop_events("e", "v", "i", VISITORS, 300), batch=20)  # 15 batches: 15 files per view
        yield built
    finally:
        repository.close()


def test_compaction_merges_small_files_and_keeps_every_row_and_answer(folded: Folded) -> None:
    before = {view: folded.rows(view) for view in (F.VISITOR_VIEW, F.ITEM_VIEW)}
    files_before = {view: folded.files(view) for view in before}
    assert all(len(files) >= 15 for files in files_before.values()), files_before
    answers_before = folded.point_in_time()
    assert answers_before["event_count"].notna().sum() > 30  # the probes find rows: the comparison means something
    export_before = PrivacyRepository(folded.repository.store, folded.repository.feature_store, folded.offline_dir)
    exported = {v: export_before.offline_rows(v) for v in ("v-0", "v-5")}

    reports = compact_history(folded.repository, folded.offline_dir, target_rows=120)
    for report in reports:
        assert report.files_before == len(files_before[report.view]) and report.files_merged > 0
        assert len(folded.files(report.view)) == report.files_after < report.files_before
        assert not report.stopped_busy
    visitor_report = reports[0]
    assert visitor_report.rows == 300 and visitor_report.files_after == 3  # 300 rows in files of up to 120
    assert visitor_report.uncompacted_after == 0
    for view, frame in before.items():
        pd.testing.assert_frame_equal(folded.rows(view), frame)
    pd.testing.assert_frame_equal(folded.point_in_time(), answers_before)
    privacy = PrivacyRepository(folded.repository.store, folded.repository.feature_store, folded.offline_dir)
    assert {v: privacy.offline_rows(v) for v in exported} == exported
    assert not list((folded.offline_dir / F.VISITOR_VIEW).glob("*.tmp"))
    for path in offline_parts(folded.offline_dir, F.VISITOR_VIEW):  # sorted by visitor: reads of one prune
        order = pq.read_table(path, columns=[F.VISITOR_KEY, F.TIMESTAMP_FIELD]).to_pylist()
        assert order == sorted(order, key=lambda r: (r[F.VISITOR_KEY], r[F.TIMESTAMP_FIELD]))

    # The index names only merged files for a visitor, and erasure removes the visitor from them.
    index = offline_index(folded.offline_dir, F.VISITOR_VIEW)
    assert index is not None
    assert {p.name for p in index.parts_holding("v-3")} <= set(folded.files(F.VISITOR_VIEW))
    assert privacy.delete_offline_rows("v-3") == (25, 3)
    assert "v-3" not in set(folded.rows(F.VISITOR_VIEW)[F.VISITOR_KEY]) and len(folded.rows(F.VISITOR_VIEW)) == 275

    # A second run merges what is still small; then there is nothing left to do.
    folded.fold(make_shop_events("e", "v", "i", VISITORS, 60, start=300), batch=20)
    again = compact_history(folded.repository, folded.offline_dir, target_rows=120)
    assert again[0].files_merged >= 2
    assert compact_history(folded.repository, folded.offline_dir, target_rows=120)[0].files_merged == 0
    assert len(folded.rows(F.VISITOR_VIEW)) == 335


def test_files_of_batches_not_yet_applied_are_never_merged(folded: Folded) -> None:
    """A part file after its log's cursor belongs to a batch that may be folded again (it replaces the file by
    name): merging it would leave its rows twice."""
    cursor = folded.repository.cursor(partition_log(0))
    assert cursor is not None
    prefix = f"part-{partition_log(0)}-"
    by_position = sorted(folded.files(F.VISITOR_VIEW), key=lambda name: int(name[len(prefix) : -len(".parquet")]))
    held_back = by_position[-3:]  # the last three batches, as if their commits were pending
    behind = str(int(held_back[0][len(prefix) : -len(".parquet")]) - 1)
    settled = settled_parts({partition_log(0): behind})
    assert [settled(name) for name in held_back] == [False, False, False]
    files = len(folded.files(F.VISITOR_VIEW))
    report = compact_view(folded.offline_dir, F.VISITOR_VIEW, settled, target_rows=10_000)
    assert (report.files_merged, report.files_written) == (files - 3, 1)
    assert report.uncompacted_after == 3  # the held-back batches' files, as written
    assert set(held_back) <= set(folded.files(F.VISITOR_VIEW))


def test_settled_names() -> None:
    settled = settled_parts({"aggregator": "1700-3", "aggregator-1": None, "aggregator-12": "99-0"})
    assert settled("part-aggregator-1700-3.parquet") and settled("part-aggregator-1699-9.parquet")
    assert not settled("part-aggregator-1700-4.parquet")  # after the cursor: may be folded again
    assert not settled("part-aggregator-1-5-0.parquet")  # a partition that has applied nothing yet
    assert settled("part-aggregator-12-98-0.parquet") and not settled("part-aggregator-12-100-0.parquet")
    assert not settled("part-aggregator-7-1-0.parquet")  # a log this store does not have (after a repartition)
    assert settled("part-20261208T101500123456-0a1b2c3d.parquet")  # written once (persona job, item ageing)
    assert settled(f"{COMPACTED_PREFIX}20261208T101500123456-0a1b2c3d.parquet")
    assert not settled("part-something-else.parquet") and not settled("part-aggregator-x.parquet")
    sqlite = settled_parts({"aggregator": "120"})
    assert sqlite("part-aggregator-120.parquet") and not sqlite("part-aggregator-121.parquet")


@given(st.lists(st.integers(min_value=1, max_value=300), max_size=40), st.integers(min_value=2, max_value=500))
def test_groups_hold_only_small_files_in_order_and_stay_near_the_target(sizes: list[int], target: int) -> None:
    paths = [(Path(f"p{n:03d}"), rows) for n, rows in enumerate(sizes)]
    groups = plan_groups(paths, target)
    flat = [p for group in groups for p in group]
    assert flat == sorted(flat) and len(set(flat)) == len(flat)
    rows = dict(paths)
    for group in groups:
        assert len(group) >= 2 and all(rows[p] < target // 2 for p in group)
        assert sum(rows[p] for p in group) <= target  # every file is below half: a group ends before it passes
    small = [p for p, count in paths if count < target // 2]
    assert len(small) - len(flat) <= len(groups) + 1  # at most one lone small file left between groups


def test_a_reader_holding_the_read_lock_makes_compaction_stop_without_loss(folded: Folded) -> None:
    before = folded.rows(F.VISITOR_VIEW)
    files = folded.files(F.VISITOR_VIEW)
    settled = settled_parts({partition_log(0): folded.repository.cursor(partition_log(0))})
    with file_lock(offline_read_lock_path(folded.offline_dir), shared=True):  # a training join in progress
        report = compact_view(folded.offline_dir, F.VISITOR_VIEW, settled, target_rows=120, lock_wait_s=0.2)
        assert report.stopped_busy and report.files_merged == 0
        assert folded.files(F.VISITOR_VIEW) == files
        assert not list((folded.offline_dir / F.VISITOR_VIEW).glob("*.tmp"))
    report = compact_view(folded.offline_dir, F.VISITOR_VIEW, settled, target_rows=120)
    assert report.files_merged > 0 and not report.stopped_busy
    pd.testing.assert_frame_equal(folded.rows(F.VISITOR_VIEW), before)


def test_the_archive_run_compacts_in_the_process_holding_partition_zero(folded: Folded) -> None:
    calls: list[int] = []

    def compact() -> list[Any]:
        reports = compact_history(folded.repository, folded.offline_dir, target_rows=120)
        calls.append(sum(r.files_merged for r in reports))
        return reports

    store = folded.repository.store
    other = PeriodicArchiver(store, 86400.0, 600.0, "other", lambda: [1], compact)
    other.run_once()
    assert calls == []  # partition 0 is someone else's: that process compacts
    holder = PeriodicArchiver(store, 86400.0, 600.0, "holder", lambda: [0], compact)
    holder.run_once()
    assert len(calls) == 1 and calls[0] > 0
    assert len(folded.files(F.VISITOR_VIEW)) == 3
