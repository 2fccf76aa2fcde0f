"""The recommend repository on each backend (Redis + Feast on Redis, SQLite + Feast on SQLite): visitor rows
the aggregator wrote, consent, the catalog (compare-and-set updates, deletes, its version), recommendation
records and impressions written off the request path (never for a visitor refusing analytics)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest

from services.common.catalog import CatalogItem
from services.common.consent import Consent, ConsentDefaults, refusing_all
from services.profile.repository import ProfileRepository
from services.recommend.repository import RecommendRepository
from tests.factories import BASE_TIME, make_event, make_item, make_visitor_state, visitor_row


@dataclass
class Repositories:
    profile: ProfileRepository  # writes what the aggregator and the consent API would
    recommend: RecommendRepository


@pytest.fixture
def repositories(profile_and_recommend: tuple[ProfileRepository, RecommendRepository]) -> Repositories:
    profile, recommend = profile_and_recommend
    return Repositories(profile, recommend)


def test_visitor_rows_read_back_by_both_paths(repositories: Repositories) -> None:
    state = make_visitor_state("v1")
    repositories.profile.write_visitor_rows([visitor_row(state)], [])
    recommend = repositories.recommend
    fast, sdk = recommend.visitor_row("v1"), recommend.visitor_row_via_sdk("v1")
    assert fast is not None and sdk is not None and fast["event_count"] == sdk["event_count"] == 3
    assert fast["views_30d"] == sdk["views_30d"] == 3
    assert recommend.visitor_row("unknown") is None and recommend.visitor_row_via_sdk("unknown") is None


def test_consent_and_who_refuses_a_purpose(repositories: Repositories) -> None:
    repositories.profile.save_consents({"yes": Consent({"marketing_email": True}, 1.0), "erased": refusing_all(2.0)})
    recommend = repositories.recommend
    assert recommend.consent("yes").given == {"marketing_email": True}
    assert recommend.consent("unknown") == Consent()
    defaults = ConsentDefaults()  # marketing is opt-in
    assert recommend.refusing("marketing_email", ["yes", "erased", "unknown", "yes"], defaults) == {
        "erased",
        "unknown",
    }


def test_catalog_updates_deletes_and_its_version(repositories: Repositories) -> None:
    recommend = repositories.recommend
    shirt, shoe = make_item(item_id="shirt", price=100_000), make_item(item_id="shoe")
    recommend.upsert_catalog([shirt, shoe])
    assert sorted(i.item_id for i in recommend.catalog()) == ["shirt", "shoe"]
    assert recommend.catalog_item("shirt") == shirt
    version = recommend.catalog_version()

    def discount(item: CatalogItem) -> CatalogItem:
        return item.model_copy(update={"price": 50_000})

    updated = recommend.update_catalog_item("shirt", discount)
    assert updated is not None and updated.price == 50_000
    assert recommend.catalog_item("shirt") == updated
    assert recommend.catalog_version() != version
    assert recommend.update_catalog_item("missing", discount) is None

    def refuse(item: CatalogItem) -> CatalogItem:
        raise ValueError("invalid merge")

    with pytest.raises(ValueError):
        recommend.update_catalog_item("shirt", refuse)
    assert recommend.catalog_item("shirt") == updated  # nothing written
    version = recommend.catalog_version()
    assert recommend.delete_catalog_item("shoe") and not recommend.delete_catalog_item("shoe")
    assert recommend.catalog_item("shoe") is None and recommend.catalog_version() != version


def test_records_and_impressions_are_written_off_the_request_path(repositories: Repositories) -> None:
    repositories.profile.save_consents({"erased": refusing_all(1.0)})
    recommend = repositories.recommend
    recommend.save_recommendation("direct", {"visitor_id": "v1", "items": ["a"]}, ttl_s=600)
    assert recommend.recommendation("direct") == {"visitor_id": "v1", "items": ["a"]}
    assert recommend.recommendation("missing") is None
    kept = make_event(visitor_id="v1", type="impression", event_id="imp-v1", item_id="a")
    dropped = make_event(visitor_id="erased", type="impression", event_id="imp-erased", item_id="a")
    assert recommend.log_events_async([kept], ("queued", {"visitor_id": "v1"}, 600))
    assert recommend.log_events_async([dropped], ("refused", {"visitor_id": "erased"}, 600))
    recommend.flush()
    assert recommend.recommendation("queued") == {"visitor_id": "v1"}
    assert recommend.recommendation("refused") is None
    assert [e.event_id for e in recommend.logged_events()] == ["imp-v1"]


def test_point_in_time_rows_see_the_state_after_every_event_of_a_shared_moment(repositories: Repositories) -> None:
    """Events that share a timestamp (a view and its cart) leave one history row, the last state: Feast's
    point-in-time join would otherwise pick any of them (training changed from run to run)."""
    import pandas as pd

    from services.features import schema as F

    states = [make_visitor_state("v-tied", event_count=n) for n in (1, 2, 3)]
    other = make_visitor_state("v-other", event_count=7)
    later = BASE_TIME + timedelta(seconds=10)
    rows = [visitor_row(states[0]), visitor_row(states[1]), visitor_row(other), visitor_row(states[2], later)]
    repositories.profile.write_visitor_rows([], rows, part="tied")
    moments = [BASE_TIME + timedelta(seconds=1), BASE_TIME + timedelta(seconds=1), later]
    wanted = pd.DataFrame(
        {
            F.VISITOR_KEY: ["v-tied", "v-other", "v-tied"],
            F.TIMESTAMP_FIELD: moments,
            "request_ts": [m.timestamp() for m in moments],
            "request_utc_offset_min": [420] * 3,
            "request_device": [""] * 3,
            "request_channel": [""] * 3,
            "request_city": [""] * 3,
        }
    )
    for _ in range(3):  # the join's answer is the same every time
        found = repositories.recommend.historical_visitor_rows(wanted.copy())
        by_key = {(r[F.VISITOR_KEY], r[F.TIMESTAMP_FIELD]): r["event_count"] for r in found.to_dict("records")}
        assert sorted(by_key.values()) == [2, 3, 7]
