"""The profile repository on each backend (Redis + Feast on Redis, SQLite + Feast on SQLite): visitor states,
cursors, consent merges, erasure marks, live profiles, the aggregator's bookkeeping and membership."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.common.consent import Consent
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from tests.conftest import REDIS_URL
from tests.factories import make_visitor_state, visitor_row


@pytest.fixture(params=["redis", "sqlite"])
def repository(request: pytest.FixtureRequest, settings_factory: Callable[..., Any]) -> Iterator[ProfileRepository]:
    settings: ProfileSettings = settings_factory(
        ProfileSettings, redis_url=REDIS_URL if request.param == "redis" else None
    )
    opened = ProfileRepository.open(settings)
    try:
        yield opened
    finally:
        opened.close()


def test_visitor_states_read_back_by_id_and_in_chunks(repository: ProfileRepository) -> None:
    states = {f"v{i}": make_visitor_state(f"v{i}", event_count=i + 1) for i in range(5)}
    repository.save_visitor_states(states, ttl_s=3600)
    assert repository.visitor_states(["v3", "missing", "v0"]) == {"v3": states["v3"], "v0": states["v0"]}
    chunks = list(repository.iter_visitor_states(chunk=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert sorted(s.visitor_id for c in chunks for s in c) == sorted(states)


def test_cursors_are_kept_per_log(repository: ProfileRepository) -> None:
    assert repository.cursor() is None
    repository.set_cursor("5-0")
    repository.set_cursor("7-1", "aggregator-1")
    repository.set_cursor("6-0")  # moves forward, replacing the old position
    assert (repository.cursor(), repository.cursor("aggregator-1")) == ("6-0", "7-1")


def test_consents_merge_per_purpose_and_the_later_choice_wins(repository: ProfileRepository) -> None:
    first = Consent({"marketing_email": True, "analytics": True}, 10.0, {"marketing_email": 10.0, "analytics": 10.0})
    stored = repository.save_consents({"v1": first})
    assert stored["v1"].given == {"marketing_email": True, "analytics": True}
    # An older refusal (a late event) does not override; a newer one does, purpose by purpose.
    late = Consent({"marketing_email": False}, 5.0, {"marketing_email": 5.0})
    newer = Consent({"analytics": False}, 20.0, {"analytics": 20.0})
    repository.save_consents({"v1": late})
    stored = repository.save_consents({"v1": newer})
    assert stored["v1"].given == {"marketing_email": True, "analytics": False}
    assert repository.consents(["v1", "v2"]) == {"v1": stored["v1"]}


def test_erasure_marks_cover_batches_read_before_the_erasure_ended(repository: ProfileRepository) -> None:
    repository.mark_erased("in-progress", None)
    repository.mark_erased("finished", 100.0)
    ids = ["in-progress", "finished", "never"]
    assert repository.erased_since(ids, read_at=50.0) == ["in-progress", "finished"]
    assert repository.erased_since(ids, read_at=150.0) == ["in-progress"]


def test_forgetting_profiles_deletes_state_and_online_row_once(repository: ProfileRepository) -> None:
    state, kept = make_visitor_state("gone"), make_visitor_state("kept")
    repository.save_visitor_states({"gone": state, "kept": kept}, ttl_s=3600)
    repository.write_visitor_rows([visitor_row(state), visitor_row(kept)], [])
    assert repository.online_visitor("gone")["event_count"] == 3
    assert repository.forget_profiles(["gone"]) == (1, 1)
    assert repository.online_visitor("gone")["event_count"] is None
    assert repository.visitor_states(["gone", "kept"]) == {"kept": kept}
    assert repository.online_visitor("kept")["event_count"] == 3
    assert repository.forget_profiles(["gone"]) == (0, 0)  # idempotent
    assert repository.forget_profiles([]) == (0, 0)


def test_commit_records_and_dead_letters_per_log(repository: ProfileRepository) -> None:
    assert repository.commit_record("aggregator") is None
    repository.save_commit_record("aggregator", b"record")
    assert repository.commit_record("aggregator") == b"record"
    repository.delete_commit_record("aggregator")
    assert repository.commit_record("aggregator") is None
    repository.save_dead_letter("aggregator", "1-0", {"error": "a"})
    repository.save_dead_letter("aggregator", "2-0", {"error": "b"})
    repository.save_dead_letter("aggregator-1", "3-0", {"error": "c"})
    repository.save_dead_letter("aggregator", "1-0", {"error": "a"})  # the same entry again: one letter
    assert repository.dead_letter_count() == 3
    assert repository.dead_letter_counts() == {"aggregator": 2, "aggregator-1": 1}
    assert sorted(d["error"] for d in repository.dead_letters()) == ["a", "b", "c"]


def test_aggregators_join_and_leave(repository: ProfileRepository) -> None:
    assert repository.join_aggregators("a", 30.0) == 1
    assert repository.join_aggregators("b", 30.0) == 2
    assert repository.join_aggregators("a", 30.0) == 2  # renewing is not joining again
    repository.leave_aggregators("a")
    assert repository.join_aggregators("b", 30.0) == 1
    repository.save_aggregator_status("aggregator", {"lag_s": 1.5})
    assert repository.aggregator_statuses() == {"aggregator": {"lag_s": 1.5}}
