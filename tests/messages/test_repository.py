"""The message repository on each backend (Redis + Feast on Redis, SQLite + Feast on SQLite), wrapping the
recommend repository: visitor rows in bulk, consent and traits, the send history's compare-and-set, the stock
watch and the message model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.common.consent import Consent, ConsentDefaults, refusing_all
from services.messages.history import SendHistory
from services.messages.repository import MessageRepository
from services.profile.repository import ProfileRepository
from services.recommend.repository import RecommendRepository
from tests.factories import BASE_TIME, make_visitor_state, visitor_row

NOW = BASE_TIME.timestamp()


@dataclass
class Repositories:
    profile: ProfileRepository  # writes what the aggregator and the consent API would
    messages: MessageRepository


@pytest.fixture
def repositories(profile_and_recommend: tuple[ProfileRepository, RecommendRepository]) -> Repositories:
    profile, recommend = profile_and_recommend
    return Repositories(profile, MessageRepository(recommend))


def test_visitor_rows_in_bulk_keep_the_order_asked(repositories: Repositories) -> None:
    states = [make_visitor_state(f"v{i}", event_count=i + 1) for i in range(3)]
    repositories.profile.write_visitor_rows([visitor_row(s) for s in states], [])
    rows = repositories.messages.visitor_rows(["v2", "unknown", "v0", "v1"], chunk=2)
    assert [r["event_count"] if r else None for r in rows] == [3, None, 1, 2]


def test_consent_and_traits_of_visitors(repositories: Repositories) -> None:
    profile, messages = repositories.profile, repositories.messages
    profile.save_consents({"yes": Consent({"analytics": True}, 1.0), "erased": refusing_all(2.0)})
    profile.save_visitor_states({"v1": make_visitor_state("v1", traits={"first_name": "Sari"})}, ttl_s=3600)
    assert [c.given.get("analytics") for c in messages.consents(["yes", "erased", "unknown"])] == [True, False, None]
    assert messages.refusing_analytics(["yes", "erased", "unknown"], ConsentDefaults()) == {"erased"}
    assert messages.refusing_analytics(["unknown"], ConsentDefaults(analytics="opt_in")) == {"unknown"}
    assert messages.visitor_traits(["v1", "unknown"]) == [{"first_name": "Sari"}, {}]


def test_a_send_is_recorded_only_while_the_cap_allows(repositories: Repositories) -> None:
    messages = repositories.messages

    def at_most_two(history: SendHistory) -> str | None:
        if len(history.sends) >= 2:
            return "capped"
        history.record(NOW, "push", "t1")
        return None

    outcomes = [messages.record_send("v1", at_most_two, NOW, keep_s=86_400, ttl_s=3600)[0] for _ in range(3)]
    assert outcomes == [None, None, "capped"]
    (stored,) = messages.histories(["v1"])
    assert len(SendHistory.from_bytes(stored).sends) == 2
    assert messages.histories(["unknown"]) == [None]


def test_stock_watch_and_message_model_round_trip(repositories: Repositories) -> None:
    messages = repositories.messages
    assert messages.stock_watch() is None
    messages.save_stock_watch(b"first")
    messages.save_stock_watch(b"second")
    assert messages.stock_watch() == b"second"
    assert messages.persona_profiles() == {}  # no persona model yet
    messages.save_model("m1", b"model-one", NOW)
    messages.save_model("m2", b"model-two", NOW + 1)
    index = messages.model_index()
    assert [v.version for v in index.versions] == ["m1", "m2"]
    assert messages.model_blob("m1", index) == b"model-one" and messages.model_blob("m2") == b"model-two"
