"""Erasure against the aggregator's offline history rows, on real Redis, Feast and parquet files. Each
interleaving is driven step by step (hooks between the aggregator's steps, events between threads), never by
sleeping:

1. a batch read before an erasure writes its part file after the erasure rewrote the files holding the
   visitor (or at any other point of the batch's writes);
2. a batch folded again after a failure replaces its part file while the erasure rewrites that same file.

After both finish, no offline row holds the erased visitor (read with pyarrow, with DuckDB and through the
export) and every other visitor's rows are all there, one per logged event."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from services.common.clock import FixedClock
from services.common.errors import StorageUnavailable
from services.common.events import Event
from services.features import schema as F
from services.features import store as feature_store_module
from services.features.aggregations import SegmentRules
from services.features.store import offline_parts_holding
from services.profile.aggregator.worker import Aggregator
from services.profile.app import ProfileState, build_state
from services.profile.settings import ProfileSettings
from tests.factories import BASE_TIME, make_shop_events
from tests.profile.test_exactly_once import Fault

CLOCK = FixedClock(BASE_TIME + timedelta(days=1))
BATCH = 40
ERASED = "er-visitor-2"
# Generous bounds on waits for another thread: a failure instead of a hang, never what orders the steps.
WAIT_S = 60.0


def shop_events(prefix: str, visitors: int, count: int, start: int = 0) -> list[Event]:
    return make_shop_events(prefix, "er-visitor", "er-item", visitors, count, start)


@pytest.fixture
def make_state(settings_factory: Callable[..., Any], tmp_path: Path) -> Iterator[Callable[..., ProfileState]]:
    """Profile parts on their own namespace, Feast project and data directory."""
    states: list[ProfileState] = []

    def make(name: str, **overrides: Any) -> ProfileState:
        settings: ProfileSettings = settings_factory(
            ProfileSettings, data_dir=tmp_path / name, offline_rows=True, **overrides
        )
        states.append(build_state(settings, clock=CLOCK))
        return states[-1]

    yield make
    for state in states:
        state.repository.close()


def aggregator_for(state: ProfileState) -> Aggregator:
    """An aggregator of its own (another process: no fold lock in common with the API's erasure)."""
    return Aggregator(state.repository, SegmentRules(), state.consent_defaults, clock=CLOCK)


def fold_all(aggregator: Aggregator) -> None:
    while aggregator.run_once(BATCH).events:
        pass


def assert_history(state: ProfileState, expected: Counter[str]) -> None:
    """The offline history holds exactly `expected` rows per visitor and nothing of ERASED, however it is read;
    the index names exactly the files that hold each visitor."""
    offline_dir = state.settings.offline_dir.resolve()
    folder = offline_dir / F.VISITOR_VIEW
    by_pyarrow = Counter[str]()
    holding: dict[str, set[str]] = {}
    for path in folder.glob("*.parquet"):
        keys = pq.read_table(path, columns=[F.VISITOR_KEY])[F.VISITOR_KEY].to_pylist()
        by_pyarrow.update(keys)
        for key in keys:
            holding.setdefault(key, set()).add(path.name)
    assert by_pyarrow == expected, "the part files hold other rows than the logged events of the kept visitors"

    query = f"SELECT {F.VISITOR_KEY}, count(*) FROM read_parquet('{folder}/*.parquet') GROUP BY 1"
    by_duckdb = Counter[str](dict(duckdb.connect().execute(query).fetchall()))
    assert by_duckdb == expected

    assert state.privacy.export(ERASED)["feature_history"] == []
    for visitor_id, rows in expected.items():
        assert len(state.privacy.export(visitor_id)["feature_history"]) == rows
    for visitor_id in [*expected, ERASED]:
        found = {p.name for p in offline_parts_holding(offline_dir, F.VISITOR_VIEW, visitor_id)}
        assert found == holding.get(visitor_id, set()), f"the offline index is wrong about {visitor_id}"


class EraseDuring:
    """Wraps `owner.name`: the first call that `concerns` the erased visitor runs the erasure (the API
    process's PrivacyService, in this thread) just before or just after the call itself."""

    def __init__(self, state: ProfileState, owner: Any, name: str, concerns: Callable[..., bool], before: bool):
        self.state = state
        self.original = getattr(owner, name)
        self.concerns = concerns
        self.before = before
        self.fired = False
        setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fired or not self.concerns(*args, **kwargs):
            return self.original(*args, **kwargs)
        self.fired = True
        if self.before:
            self.state.privacy.erase(ERASED)
        result = self.original(*args, **kwargs)
        if not self.before:
            self.state.privacy.erase(ERASED)
        return result


def rows_hold_erased(online: Any, offline: Any, part: str | None = None) -> bool:
    return any(row[F.VISITOR_KEY] == ERASED for row in offline)


def ids_hold_erased(visitor_ids: Any, read_at: float) -> bool:
    return ERASED in visitor_ids


# Where, in the aggregator's batch holding the visitor, the erasure runs (the batch was read before it).
POINTS: dict[str, Callable[[ProfileState], EraseDuring]] = {
    "before the part file is written": lambda s: EraseDuring(
        s, s.repository, "write_visitor_rows", rows_hold_erased, before=True
    ),
    "after the part file is written": lambda s: EraseDuring(
        s, s.repository, "write_visitor_rows", rows_hold_erased, before=False
    ),
    "between the commit's two checks": lambda s: EraseDuring(
        s, s.repository, "erased_since", ids_hold_erased, before=False
    ),
}


@pytest.mark.parametrize("restart", [False, True], ids=["same process", "record applied after a crash"])
@pytest.mark.parametrize("point", list(POINTS))
def test_an_erasure_during_a_batch_leaves_no_offline_row_of_the_visitor(
    point: str, restart: bool, make_state: Callable[..., ProfileState]
) -> None:
    state = make_state("race")
    events = shop_events("er", visitors=6, count=150)
    state.ingest.ingest(events)
    hook = POINTS[point](state)
    aggregator = aggregator_for(state)
    if restart:
        # The process dies while applying the commit record of the visitor's batch, after the erasure: the
        # next aggregator applies the record again and must leave no row of the visitor either.
        fault = Fault(state.repository, "forget_profiles", 1, lambda ids: ERASED in ids)
        with pytest.raises(StorageUnavailable):
            fold_all(aggregator)
        assert fault.fired
        aggregator = aggregator_for(state)
    fold_all(aggregator)
    assert hook.fired

    assert state.repository.visitor_states([ERASED]) == {}
    assert state.repository.online_visitor(ERASED).get("event_count") is None
    assert_history(state, Counter(e.visitor_id for e in events if e.visitor_id != ERASED))


@contextmanager
def observed_file_locks(thread_name: str, requested: threading.Event) -> Iterator[None]:
    """Sets `requested` whenever the thread named `thread_name` asks for one of the offline store's file locks
    (before it blocks on it): how the test knows that a writer is waiting for the erasure's lock."""
    original = feature_store_module.file_lock

    @contextmanager
    def observed(path: Path) -> Iterator[None]:
        if threading.current_thread().name == thread_name:
            requested.set()
        with original(path):
            yield

    feature_store_module.file_lock = observed
    try:
        yield
    finally:
        feature_store_module.file_lock = original


def test_a_batch_folded_again_while_an_erasure_rewrites_its_part_file(
    make_state: Callable[..., ProfileState],
) -> None:
    """The batch's first fold writes its part file and fails before its commit record; folded again (having
    read more of the log meanwhile), it writes the same part file while an erasure is between reading that
    file and replacing it. Neither writer may lose the other's work: the erased visitor's rows are gone,
    every other visitor's are there (including those the second fold added)."""
    state = make_state("refold", log_partitions=1)
    first = shop_events("rf", visitors=3, count=30)  # er-visitor-0, 1, 2 (ERASED)
    state.ingest.ingest(first)
    fault = Fault(state.repository, "save_commit_record", 1)
    with pytest.raises(StorageUnavailable):
        aggregator_for(state).run_once(100)
    assert fault.fired
    parts = sorted((state.settings.offline_dir / F.VISITOR_VIEW).glob("part-aggregator-*.parquet"))
    assert len(parts) == 1
    written = Counter(pq.read_table(parts[0], columns=[F.VISITOR_KEY])[F.VISITOR_KEY].to_pylist())
    assert written == Counter(e.visitor_id for e in first)
    later = [e for e in shop_events("rf", visitors=4, count=12, start=30) if e.visitor_id == "er-visitor-3"]
    state.ingest.ingest(later)

    refold_read, refold_go, refold_waits = threading.Event(), threading.Event(), threading.Event()
    erasure_read, erasure_go = threading.Event(), threading.Event()
    errors: dict[str, BaseException] = {}
    receipts: list[Any] = []

    # The re-fold stops once it has read and folded the batch, just before it writes the visitor rows.
    write_rows = state.repository.write_visitor_rows

    def paused_write(*args: Any, **kwargs: Any) -> None:
        refold_read.set()
        assert refold_go.wait(WAIT_S)
        write_rows(*args, **kwargs)
        refold_waits.set()  # written without waiting for anyone

    state.repository.write_visitor_rows = paused_write  # type: ignore[method-assign]

    # The erasure stops between reading the part file (to find the visitor's rows) and replacing it.
    privacy_repository = state.privacy.repository
    purge = privacy_repository._purge_offline

    def paused_purge(keep: Callable[[Any], Any], columns: Any, visitor_id: str | None = None) -> tuple[int, int]:
        def paused_keep(table: Any) -> Any:
            erasure_read.set()
            assert erasure_go.wait(WAIT_S)
            return keep(table)

        return purge(paused_keep, columns, visitor_id)

    privacy_repository._purge_offline = paused_purge  # type: ignore[method-assign]

    def run(name: str, work: Callable[[], Any]) -> None:
        try:
            work()
        except BaseException as exc:  # reported by the test thread
            errors[name] = exc

    refold = threading.Thread(
        target=run, args=("refold", lambda: aggregator_for(state).run_once(100)), name="refold", daemon=True
    )
    erasure = threading.Thread(
        target=run, args=("erasure", lambda: receipts.append(state.privacy.erase(ERASED))), daemon=True
    )
    with observed_file_locks("refold", refold_waits):
        refold.start()
        assert refold_read.wait(WAIT_S), errors  # the re-fold read the erased visitor's events before the erasure
        erasure.start()
        assert erasure_read.wait(WAIT_S), errors
        refold_go.set()
        # The re-fold either wrote its part file (without a lock) or waits for the erasure's lock.
        assert refold_waits.wait(WAIT_S), errors
        erasure_go.set()
        erasure.join(WAIT_S)
        refold.join(WAIT_S)
    assert not erasure.is_alive() and not refold.is_alive()
    assert errors == {}
    assert receipts[0].offline_rows == written[ERASED]

    assert state.repository.visitor_states([ERASED]) == {}
    assert_history(state, Counter(e.visitor_id for e in first + later if e.visitor_id != ERASED))
