"""Erasure against the persona job's offline history rows, on real Redis, Feast and parquet files.

The job reads the visitor states, re-checks them (compare-and-skip) and then writes the changed rows online and
to a new part file. An erasure in the API process can run at any point of that: each interleaving is driven by a
hook on the job's steps (the erasure runs in the hook, in this thread), never by sleeping. Afterwards no row of
the erased visitor is left, online or offline (pyarrow, DuckDB, the export, the offline index), and every other
visitor's rows are all there: one per logged event and one the job wrote."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.features import schema as F
from services.features.aggregations import SegmentRules
from services.profile.app import ProfileState, build_state
from services.profile.persona_jobs import run_persona_job
from services.profile.personas.repository import PersonaRepository
from services.profile.settings import ProfileSettings
from tests.profile.test_erasure_races import (
    CLOCK,
    ERASED,
    EraseDuring,
    aggregator_for,
    assert_history,
    fold_all,
    ids_hold_erased,
    shop_events,
)

# The personas need 10 active visitors (5 events or more) per persona: 24 visitors of 8 events, k = 2 or 3.
VISITORS = 24
EVENTS = VISITORS * 8


def rows_hold_erased(rows: Any) -> bool:
    return any(row[F.VISITOR_KEY] == ERASED for row in rows)


# Where, in the job's run, the erasure runs (always after the job read the visitor's state).
POINTS: dict[str, Callable[[ProfileState, PersonaRepository], EraseDuring]] = {
    # The race: the erasure rewrote the files holding the visitor before the job's part file existed.
    "between the job's re-check and its write": lambda s, p: EraseDuring(
        s, p, "write_visitor_rows", rows_hold_erased, before=True
    ),
    "after the job's write": lambda s, p: EraseDuring(s, p, "write_visitor_rows", rows_hold_erased, before=False),
    "after the job's check for erasures": lambda s, p: EraseDuring(s, p, "erased_since", ids_hold_erased, before=False),
}


@pytest.fixture
def state(settings_factory: Callable[..., Any], tmp_path: Path) -> Iterator[ProfileState]:
    settings: ProfileSettings = settings_factory(ProfileSettings, data_dir=tmp_path / "pj", offline_rows=True)
    built = build_state(settings, clock=CLOCK)
    yield built
    built.repository.close()


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_an_erasure_during_the_persona_job_leaves_no_row_of_the_visitor(point: str, state: ProfileState) -> None:
    events = shop_events("pj", visitors=VISITORS, count=EVENTS)
    state.ingest.ingest(events)
    fold_all(aggregator_for(state))
    personas = PersonaRepository(state.repository.store, state.repository.feature_store, state.settings.offline_dir)
    hook = POINTS[point](state, personas)

    result = run_persona_job(personas, SegmentRules(), k_range=range(2, 4), now=CLOCK.now())
    assert hook.fired
    # No model served before: the job gave every visitor a persona and wrote each one's row (the erased one
    # included, whose state it had read before the erasure).
    assert result.visitors == VISITORS and result.skipped_busy == 0

    assert state.repository.visitor_states([ERASED]) == {}
    kept = Counter(e.visitor_id for e in events if e.visitor_id != ERASED)
    assert len(kept) == VISITORS - 1
    assert_history(state, kept + Counter(kept.keys()))  # the aggregator's rows and the job's one per visitor
    online = state.repository.online_visitor(ERASED)
    assert online["persona_id"] is None and online["event_count"] is None
    for row in personas.online_rows(sorted(kept)):
        assert row["persona_id"] is not None and row["persona_id"] >= 0
