"""The privacy repository on each backend (Redis + Feast on Redis, SQLite + Feast on SQLite): every place
erasure and export reach reads back what is kept and deletes exactly the visitor's share, once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import orjson
import pytest
import time_machine

from services.common.consent import Consent, refusing_all
from services.common.events import Event, envelope
from services.common.storage import Namespace, PendingEvent
from services.common.storage.redis_store import RedisStore
from services.features import schema as F
from services.profile.privacy.repository import PrivacyRepository, index_recommendation_records
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from services.recommend.repository import RecommendRepository
from tests.conftest import REDIS_URL
from tests.factories import BASE_TIME, make_event, make_visitor_state, visitor_row


@dataclass
class Places:
    profile: ProfileRepository  # writes what the aggregator and the ingest would
    privacy: PrivacyRepository


@pytest.fixture(params=["redis", "sqlite"])
def places(request: pytest.FixtureRequest, settings_factory: Callable[..., Any]) -> Iterator[Places]:
    settings: ProfileSettings = settings_factory(
        ProfileSettings, redis_url=REDIS_URL if request.param == "redis" else None
    )
    profile = ProfileRepository.open(settings)
    try:
        yield Places(profile, PrivacyRepository(profile.store, profile.feature_store, settings.offline_dir))
    finally:
        profile.close()


def log(places: Places, events: list[Event]) -> int:
    pending = [PendingEvent(e.event_id, e.visitor_id, envelope(e, e.ts)) for e in events]
    return places.profile.append(pending).accepted


def test_the_live_profile_reads_back_and_is_forgotten_with_consent_kept(places: Places) -> None:
    privacy = places.privacy
    state = make_visitor_state("v1")
    places.profile.save_visitor_states({"v1": state}, ttl_s=3600)
    places.profile.write_visitor_rows([visitor_row(state)], [])
    privacy.merge_consent("v1", Consent({"analytics": True}, 10.0, {"analytics": 10.0}))
    assert privacy.visitor_state("v1") == state
    consent = privacy.consent("v1")
    assert consent is not None and consent.given == {"analytics": True}
    online = privacy.online_features("v1")
    assert online is not None and online["event_count"] == 3 and F.VISITOR_KEY not in online
    assert (privacy.visitor_state("v2"), privacy.consent("v2"), privacy.online_features("v2")) == (None, None, None)

    assert privacy.forget_profiles(["v1"]) == (1, 1)
    assert privacy.forget_profiles(["v1"]) == (0, 0)
    assert privacy.visitor_state("v1") is None and privacy.online_features("v1") is None
    assert privacy.consent("v1") == consent  # the consent record is not part of the profile


def test_the_tombstone_refuses_everything_unless_a_newer_choice_was_made(places: Places) -> None:
    privacy = places.privacy
    privacy.merge_consent("v1", Consent({"marketing_email": True}, 10.0, {"marketing_email": 10.0}))
    privacy.merge_consent("v1", refusing_all(20.0))
    consent = privacy.consent("v1")
    assert consent is not None and not any(consent.given.values())
    # A choice made after the erasure wins over the tombstone, however late it is stored.
    privacy.merge_consent("v1", Consent({"marketing_email": True}, 30.0, {"marketing_email": 30.0}))
    privacy.merge_consent("v1", refusing_all(20.0))
    consent = privacy.consent("v1")
    assert consent is not None and consent.given["marketing_email"] and not consent.given["analytics"]
    privacy.mark_erased("v1", None)
    assert places.profile.erased_since(["v1"], read_at=0.0) == ["v1"]


def test_the_visitors_events_are_found_deleted_and_their_ids_forgotten(places: Places) -> None:
    privacy = places.privacy
    mine = [make_event(visitor_id="v1", event_id=f"v1-{n}") for n in range(3)]
    theirs = [make_event(visitor_id="v1-other", event_id=f"o-{n}") for n in range(2)]  # a longer id, same prefix
    assert log(places, [*mine, *theirs]) == 5
    found = list(privacy.visitor_events("v1"))
    assert [event.event_id for _, event in found] == ["v1-0", "v1-1", "v1-2"]
    assert privacy.delete_log_events("v1") == 3
    assert list(privacy.visitor_events("v1")) == []
    assert privacy.delete_log_events("v1") == 0
    assert [e.event_id for _, e in privacy.visitor_events("v1-other")] == ["o-0", "o-1"]
    # The ids were still remembered (a re-send is a duplicate) until forgotten.
    assert log(places, mine[:1]) == 0
    privacy.forget_event_ids([e.event_id for e in mine], "v1")
    assert log(places, mine[:1]) == 1
    # Without archive files there is nothing to delete there.
    assert privacy.delete_archived_events("v1") == (0, 0)


def test_retention_deletes_hot_entries_by_position(places: Places) -> None:
    privacy = places.privacy
    log(places, [make_event(visitor_id=f"v{n}", event_id=f"e{n}") for n in range(4)])
    entries = list(privacy.hot_log())
    assert len(entries) == 4
    by_partition: dict[int, list[str]] = {}
    for entry in entries[:2]:
        by_partition.setdefault(entry.partition, []).append(entry.position)
    assert sum(privacy.delete_log_positions(p, positions) for p, positions in by_partition.items()) == 2
    assert [e.position for e in privacy.hot_log()] == [e.position for e in entries[2:]]
    assert privacy.apply_archive_retention(BASE_TIME.timestamp(), dry_run=False) == (0, 0)


def test_recommendation_records_of_the_visitor_only(places: Places) -> None:
    """Written as the recommend service writes them (with each visitor's set of record ids), found by that set:
    another visitor's records, an id whose record expired and a record that names someone else stay out."""
    privacy, store = places.privacy, places.profile.store
    writer = RecommendRepository(store, places.profile.feature_store)
    records = {"r1": {"visitor_id": "v1"}, "r2": {"visitor_id": "v1-other"}, "r3": {"visitor_id": "v1"}}
    assert all(writer.log_events_async([], (k, v, 600)) for k, v in records.items())
    writer.flush()
    writer.save_recommendation("r4", {"visitor_id": "v1"}, ttl_s=600)
    store.add_members(Namespace.RECOMMENDATIONS_BY_VISITOR, {"v1": ["gone", "r2"]}, 600)  # stale or wrong ids
    found = privacy.recommendation_records("v1")
    assert found == {"r1": records["r1"], "r3": records["r3"], "r4": {"visitor_id": "v1"}}
    assert privacy.delete_recommendation_records("v1", list(found)) == 3
    assert store.members(Namespace.RECOMMENDATIONS_BY_VISITOR, "v1") == set()
    assert privacy.recommendation_records("v1") == {} and privacy.delete_recommendation_records("v1", []) == 0
    assert list(privacy.recommendation_records("v1-other")) == ["r2"]


def test_records_of_an_earlier_version_are_indexed_once_by_the_admin_command(places: Places) -> None:
    """Records written before the per-visitor sets existed (plain puts) are found after the index command."""
    privacy, store = places.privacy, places.profile.store
    old = {"o1": {"visitor_id": "v1"}, "o2": {"visitor_id": "v2"}, "o3": {"no_visitor": True}}
    store.put_many(Namespace.RECOMMENDATIONS, {k: orjson.dumps(v) for k, v in old.items()}, 600)
    assert privacy.recommendation_records("v1") == {}  # not in the index yet
    assert index_recommendation_records(store, 600) == 2
    assert privacy.recommendation_records("v1") == {"o1": old["o1"]}
    assert privacy.recommendation_records("v2") == {"o2": old["o2"]}
    assert index_recommendation_records(store, 600) == 2  # again: nothing twice
    assert store.members(Namespace.RECOMMENDATIONS_BY_VISITOR, "v1") == {"o1"}


def test_member_sets_add_expire_and_delete(places: Places) -> None:
    store = places.profile.store
    sets = Namespace.RECOMMENDATIONS_BY_VISITOR
    store.add_members(sets, {"a": ["x", "y"], "b": ["z"], "empty": []}, 600)
    store.add_members(sets, {"a": ["y", "w"]}, 600)
    assert store.members(sets, "a") == {"x", "y", "w"} and store.members(sets, "b") == {"z"}
    assert store.members(sets, "empty") == set() and store.members(sets, "unknown") == set()
    assert store.delete(sets, ["a", "unknown"]) == 1
    assert store.members(sets, "a") == set() and store.members(sets, "b") == {"z"}
    with pytest.raises(ValueError, match="unindexed"):
        store.add_members(Namespace.CONSENT, {"a": ["x"]}, 600)  # an indexed namespace's scan reads values
    if isinstance(store, RedisStore):  # Redis expires the set itself
        ttl = cast(int, store.client.ttl(store._blob_key(sets, "b")))
        assert 590 <= ttl <= 600
    else:
        with time_machine.travel(time.time() + 601, tick=False):
            assert store.members(sets, "b") == set()


def test_offline_rows_of_the_visitor_and_older_than_a_cutoff_are_removed(places: Places) -> None:
    privacy = places.privacy
    days = [BASE_TIME + timedelta(days=d) for d in range(3)]
    rows = [visitor_row(make_visitor_state(v), at) for at in days for v in ("v1", "v2")]
    places.profile.write_visitor_rows([], rows[:4], part="first")
    places.profile.write_visitor_rows([], rows[4:], part="second")
    assert [r[F.TIMESTAMP_FIELD] for r in privacy.offline_rows("v1")] == days
    assert privacy.delete_offline_rows("v1") == (3, 2)
    assert privacy.offline_rows("v1") == [] and privacy.delete_offline_rows("v1") == (0, 0)
    assert len(privacy.offline_rows("v2")) == 3
    assert privacy.count_offline_rows_before(days[2]) == 2
    assert privacy.delete_offline_rows_before(days[2]) == (2, 1)
    assert [r[F.TIMESTAMP_FIELD] for r in privacy.offline_rows("v2")] == days[2:]


def test_the_admin_command_indexes_recommendation_records(
    settings_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    for name in ("REDIS_URL", "SELARAS_REDIS_URL"):  # the embedded store of --data-dir, as the settings below
        monkeypatch.delenv(name, raising=False)
    settings: ProfileSettings = settings_factory(ProfileSettings, redis_url=None)
    profile = ProfileRepository.open(settings)
    try:
        profile.store.put(Namespace.RECOMMENDATIONS, "old", orjson.dumps({"visitor_id": "v1"}), 600)
        result = CliRunner().invoke(app, ["admin", "index-recommendations", "--data-dir", str(settings.data_dir)])
        assert result.exit_code == 0, result.output
        assert "1 recommendation records indexed" in result.output
        privacy = PrivacyRepository(profile.store, profile.feature_store, settings.offline_dir)
        assert privacy.recommendation_records("v1") == {"old": {"visitor_id": "v1"}}
    finally:
        profile.close()
