"""Export and erasure of one visitor read and rewrite only the offline part files that hold the visitor (the
visitor view's index, services/features/offline_index.py), on real parquet files: a part folded again under
its name, a store written before the index existed, retention and the persona back-fill keep the index true,
and two erasures at once lose no one else's rows."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from services.features import schema as F
from services.features.store import file_lock, offline_index, offline_parts_holding, to_arrow_table
from services.profile.personas.repository import PersonaRepository
from services.profile.privacy.repository import PrivacyRepository
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from tests.factories import BASE_TIME, make_visitor_state, visitor_row


@dataclass
class History:
    profile: ProfileRepository  # writes part files the way the aggregator does
    privacy: PrivacyRepository
    offline_dir: Path

    @property
    def folder(self) -> Path:
        return self.offline_dir / F.VISITOR_VIEW

    def write(self, part: str, visitors: list[str], day: int = 0) -> None:
        at = BASE_TIME + timedelta(days=day)
        self.profile.write_visitor_rows([], [visitor_row(make_visitor_state(v), at) for v in visitors], part=part)

    def path(self, part: str) -> Path:
        return self.folder / f"part-{part}.parquet"

    def holding(self, visitor_id: str) -> list[str]:
        """The part files the index names for the visitor."""
        return [p.name for p in offline_parts_holding(self.offline_dir, F.VISITOR_VIEW, visitor_id)]

    def scanned(self, visitor_id: str) -> list[str]:
        """The part files that hold the visitor, by reading every one."""
        return sorted(
            path.name
            for path in self.folder.glob("*.parquet")
            if visitor_id in pq.read_table(path, columns=[F.VISITOR_KEY])[F.VISITOR_KEY].to_pylist()
        )

    def rows_by_visitor(self) -> Counter[str]:
        found = Counter[str]()
        for path in self.folder.glob("*.parquet"):
            found.update(pq.read_table(path, columns=[F.VISITOR_KEY])[F.VISITOR_KEY].to_pylist())
        return found


@pytest.fixture
def history(settings_factory: Callable[..., Any]) -> Iterator[History]:
    settings: ProfileSettings = settings_factory(ProfileSettings, redis_url=None)
    profile = ProfileRepository.open(settings)
    try:
        privacy = PrivacyRepository(profile.store, profile.feature_store, settings.offline_dir)
        yield History(profile, privacy, settings.offline_dir.resolve())
    finally:
        profile.close()


def test_export_and_erasure_open_only_the_files_holding_the_visitor(history: History) -> None:
    for n in range(8):
        others = [f"o{n}-{k}" for k in range(5)] + ["shared"]
        history.write(f"batch-{n}", [*others, "target"] if n in (2, 5) else others, day=n)
    assert history.holding("target") == ["part-batch-2.parquet", "part-batch-5.parquet"]
    # The other files are made unreadable (not parquet any more): opening one would fail the export or erasure.
    untouched = [history.path(f"batch-{n}") for n in range(8) if n not in (2, 5)]
    for path in untouched:
        path.write_bytes(b"not a parquet file")
    stamps = {path: path.stat().st_mtime_ns for path in untouched}

    exported = history.privacy.offline_rows("target")
    assert [row[F.TIMESTAMP_FIELD] for row in exported] == [BASE_TIME + timedelta(days=d) for d in (2, 5)]
    assert history.privacy.delete_offline_rows("target") == (2, 2)
    assert {path: path.stat().st_mtime_ns for path in untouched} == stamps
    assert all(path.read_bytes() == b"not a parquet file" for path in untouched)
    assert history.holding("target") == [] and history.privacy.offline_rows("target") == []
    assert history.privacy.delete_offline_rows("target") == (0, 0)
    # The rewritten files kept everyone else's rows, and the index still finds them there.
    for n in (2, 5):
        kept = pq.read_table(history.path(f"batch-{n}"), columns=[F.VISITOR_KEY])[F.VISITOR_KEY].to_pylist()
        assert sorted(kept) == sorted([f"o{n}-{k}" for k in range(5)] + ["shared"])
        assert history.holding(f"o{n}-0") == [f"part-batch-{n}.parquet"]


def test_a_part_folded_again_under_its_name_replaces_its_entries(history: History) -> None:
    history.write("aggregator-1-5", ["a", "b"])
    history.write("aggregator-1-9", ["b"])
    # The same batch folded again after a failure, having read more of the log: a leaves the part, c joins.
    history.write("aggregator-1-5", ["b", "c", "c"])
    assert history.holding("a") == [] and history.privacy.offline_rows("a") == []
    assert history.holding("b") == ["part-aggregator-1-5.parquet", "part-aggregator-1-9.parquet"]
    assert history.holding("c") == ["part-aggregator-1-5.parquet"]
    # c's two events share a moment: one history row, the state after both.
    assert len(history.privacy.offline_rows("c")) == 1
    assert history.privacy.delete_offline_rows("a") == (0, 0)
    assert history.privacy.delete_offline_rows("c") == (1, 1)
    assert history.rows_by_visitor() == Counter({"b": 2})


def test_a_store_written_without_the_index_is_indexed_on_first_use_and_answers_as_a_full_scan(
    history: History, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(3)
    history.folder.mkdir(parents=True, exist_ok=True)
    # Part files as the aggregator wrote them before the index existed: straight into the folder.
    for n in range(30):
        visitors = [f"v{k}" for k in rng.choice(40, size=12, replace=False)]
        rows = [visitor_row(make_visitor_state(v), BASE_TIME + timedelta(hours=n)) for v in visitors]
        pq.write_table(to_arrow_table(rows, F.VISITOR_KEY, F.VISITOR_FEATURES), history.path(f"old-{n}"))
    # And one written since, through the writer, which indexes only its own file.
    history.write("new-0", ["v1", "v-new"])
    expected = {v: history.scanned(v) for v in [f"v{k}" for k in range(40)] + ["v-new", "nobody"]}

    with caplog.at_level(logging.INFO, logger="services.features.offline_index"):
        exported = history.privacy.offline_rows("v1")
        assert {v: history.holding(v) for v in expected} == expected
    # This thread's records only: a background thread left by another test may index its own store meanwhile.
    catch_ups = [
        r for r in caplog.records if r.name == "services.features.offline_index" and r.thread == threading.get_ident()
    ]
    assert [r.getMessage() for r in catch_ups] == ["indexing offline part files"]  # one catch-up, then none
    assert catch_ups[0].__dict__["files"] == 30
    full_scan = [row for path in sorted(history.folder.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert exported == sorted((r for r in full_scan if r[F.VISITOR_KEY] == "v1"), key=lambda r: r[F.TIMESTAMP_FIELD])

    # A file removed by a process that does not know the index (an older version's retention) leaves it too.
    history.path("old-0").unlink()
    assert all(name != "part-old-0.parquet" for v in expected for name in history.holding(v))
    before = history.rows_by_visitor()
    removed, files = history.privacy.delete_offline_rows("v2")
    assert (removed, files) == (before["v2"], len(expected["v2"]) - ("part-old-0.parquet" in expected["v2"]))
    assert history.rows_by_visitor() == before - Counter({"v2": before["v2"]})


def test_retention_and_the_persona_backfill_keep_the_index_true(history: History) -> None:
    history.write("day-0", ["a", "b"], day=0)
    history.write("day-1", ["a", "c"], day=1)
    mixed = [
        visitor_row(make_visitor_state(v), BASE_TIME + timedelta(days=d)) for v, d in (("a", 0), ("d", 0), ("e", 3))
    ]
    history.profile.write_visitor_rows([], mixed, part="mixed")
    history.write("day-3", ["b"], day=3)
    # Retention reads every file: day-0 is left empty (deleted), `mixed` loses a and d and keeps e.
    assert history.privacy.delete_offline_rows_before(BASE_TIME + timedelta(days=1)) == (4, 2)
    visitors = ["a", "b", "c", "d", "e"]
    assert {v: history.holding(v) for v in visitors} == {v: history.scanned(v) for v in visitors}
    assert not history.path("day-0").exists() and history.holding("a") == ["part-day-1.parquet"]

    personas = PersonaRepository(history.profile.store, history.profile.feature_store, history.offline_dir)
    changed, files = personas.rewrite_offline_persona_ids(["event_count"], lambda rows: np.full(len(rows), 4))
    assert (changed, files) == (4, 3)
    assert {v: history.holding(v) for v in visitors} == {v: history.scanned(v) for v in visitors}
    assert history.privacy.delete_offline_rows("e") == (1, 1)
    assert [row["persona_id"] for row in history.privacy.offline_rows("b")] == [4]


def test_two_erasures_at_once_lose_no_one_elses_rows(history: History) -> None:
    rng = np.random.default_rng(11)
    for n in range(40):
        # Both erased visitors share most files with each other and with everyone else.
        visitors = [f"v{k}" for k in rng.choice(30, size=10, replace=False)] + ["x"] * (n % 3 != 0) + ["y"] * (n % 2)
        history.write(f"batch-{n}", visitors, day=n % 5)
    before = history.rows_by_visitor()
    assert before["x"] > 20 and before["y"] == 20
    start = threading.Barrier(3)
    receipts: dict[str, tuple[int, int]] = {}

    def erase(visitor_id: str) -> None:
        start.wait()
        receipts[visitor_id] = history.privacy.delete_offline_rows(visitor_id)

    def fold() -> None:
        # The aggregator keeps writing parts meanwhile, one of them holding x again (a late event).
        start.wait()
        for n in range(40, 46):
            history.write(f"batch-{n}", ["late", "x"] if n == 45 else ["late"])

    threads = [threading.Thread(target=erase, args=(v,)) for v in ("x", "y")] + [threading.Thread(target=fold)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = history.rows_by_visitor()
    assert receipts["y"] == (20, 20)
    assert receipts["x"][0] in (before["x"], before["x"] + 1)  # the late row is erased too when written in time
    assert after - Counter({"late": 6, "x": after["x"]}) == before - Counter({"x": before["x"], "y": before["y"]})
    assert sum(after.values()) == sum(before.values()) - before["y"] - receipts["x"][0] + 6 + 1
    # The late part holds x only when it was written after the erasure looked; then erasing again finds it.
    assert history.holding("x") == history.scanned("x")
    assert history.privacy.delete_offline_rows("x") == (after["x"], after["x"])
    assert history.rows_by_visitor()["x"] == 0


def test_the_admin_command_indexes_an_old_store_ahead_of_the_first_erasure(history: History) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    history.folder.mkdir(parents=True, exist_ok=True)
    for n in range(6):  # written before the index existed: straight into the folder
        rows = [visitor_row(make_visitor_state(v), BASE_TIME + timedelta(hours=n)) for v in (f"v{n}", "shared")]
        pq.write_table(to_arrow_table(rows, F.VISITOR_KEY, F.VISITOR_FEATURES), history.path(f"old-{n}"))
    data_dir = history.offline_dir.parent
    first = CliRunner().invoke(app, ["admin", "index-offline", "--data-dir", str(data_dir)])
    assert first.exit_code == 0, first.output
    assert "6 part files" in first.output
    again = CliRunner().invoke(app, ["admin", "index-offline", "--data-dir", str(data_dir)])
    assert again.exit_code == 0 and "0 part files" in again.output
    # Every file is indexed: nothing is left for the first erasure to read, which opens only the visitor's file.
    index = offline_index(history.offline_dir, F.VISITOR_VIEW)
    assert index is not None and index.catch_up() == 0
    assert history.privacy.delete_offline_rows("v3") == (1, 1)
    assert history.holding("shared") == [f"part-old-{n}.parquet" for n in range(6)]


def test_the_aggregator_removes_erased_visitors_from_its_own_part_only(history: History) -> None:
    history.write("aggregator-1-5", ["a", "b", "c"])
    history.write("aggregator-1-9", ["b", "c"], day=1)
    other = history.path("aggregator-1-9")
    stamp = other.stat().st_mtime_ns
    assert history.profile.forget_history_rows("aggregator-1-5", ["b", "nobody"]) == 1
    assert history.profile.forget_history_rows("aggregator-1-5", ["b"]) == 0  # applied again: nothing left
    assert history.profile.forget_history_rows("aggregator-1-7", ["b"]) == 0  # no such part (no history rows)
    assert other.stat().st_mtime_ns == stamp
    assert history.rows_by_visitor() == Counter({"a": 1, "b": 1, "c": 2})
    visitors = ["a", "b", "c"]
    assert {v: history.holding(v) for v in visitors} == {v: history.scanned(v) for v in visitors}
    assert history.holding("b") == ["part-aggregator-1-9.parquet"]
    # Every row of the part removed: the file stays, empty (only rewriters, under the rewrite lock, delete files).
    assert history.profile.forget_history_rows("aggregator-1-5", ["a", "c"]) == 2
    assert history.path("aggregator-1-5").exists() and pq.read_metadata(history.path("aggregator-1-5")).num_rows == 0
    assert {v: history.holding(v) for v in visitors} == {v: history.scanned(v) for v in visitors}
    assert len(history.privacy.offline_rows("c")) == 1


def test_part_writes_do_not_wait_for_a_whole_rewrite_run(history: History) -> None:
    """A retention or persona back-fill run holds the rewrite lock for minutes; the aggregator's writes take only
    the per-file write lock, so they go on meanwhile (and wait at most for one file's rewrite)."""
    history.write("aggregator-1-5", ["a", "b"])
    done = threading.Event()

    def fold() -> None:
        history.write("aggregator-1-9", ["a", "c"])
        history.profile.forget_history_rows("aggregator-1-5", ["b"])
        done.set()

    with file_lock(history.offline_dir / f".{F.VISITOR_VIEW}.rewrite.lock"):
        writer = threading.Thread(target=fold, daemon=True)
        writer.start()
        finished = done.wait(60)  # a bound for a failure instead of a hang, not an ordering
    writer.join(60)
    assert finished, "a part write waited for the rewrite lock"
    assert history.rows_by_visitor() == Counter({"a": 2, "c": 1})
