"""Consent per visitor and purpose on real Redis + Feast: configurable defaults, consent by API and by
`profile_update` events, withdrawal deletes the behavioural profile, no personalization without consent
(generic ranking), no marketing message without marketing consent."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from services.common.consent import PURPOSES, Consent, ConsentDefaults, consent_changes_from_properties
from services.common.events import Event
from services.common.settings import CommonSettings
from services.features import schema as F
from services.features.store import online_rows
from services.profile.app import create_app
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app as create_recommend_app
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings
from services.recommend.training.train import TrainConfig, Trainer
from tests.conftest import REDIS_URL, SessionWorld, clean_namespace, unique_name
from tests.factories import BASE_TIME, make_event_dict, make_item


def views(visitor_id: str, n: int, start: float = 0.0, **extra: Any) -> list[Event]:
    """`n` product views, `start` hours after BASE_TIME, one minute apart."""
    return [
        Event.model_validate(
            make_event_dict(
                visitor_id=visitor_id,
                item_id="c-item",
                timestamp=(BASE_TIME + timedelta(hours=start, minutes=i)).isoformat(),
                **extra,
            )
        )
        for i in range(n)
    ]


def profile_update(visitor_id: str, hours: float, **properties: Any) -> Event:
    return Event.model_validate(
        make_event_dict(
            visitor_id=visitor_id,
            type="profile_update",
            item_id=None,
            price=None,
            timestamp=(BASE_TIME + timedelta(hours=hours)).isoformat(),
            properties=properties,
        )
    )


@dataclass
class Shop:
    settings: ProfileSettings
    client: TestClient

    @property
    def state(self) -> Any:
        return self.client.app.state.profile  # type: ignore[attr-defined]

    def send(self, events: list[Event]) -> None:
        self.state.ingest.ingest(events)
        while self.state.aggregator.run_once(5000).events:
            pass

    def profile_kept(self, visitor_id: str) -> bool:
        state = self.state.repository.visitor_states([visitor_id]).get(visitor_id)
        row = online_rows(self.state.repository.feature_store, F.VISITOR_VIEW, [visitor_id])[0]
        assert (state is None) == (row["event_count"] is None), "state and online row must agree"
        return state is not None

    def consent(self, visitor_id: str, **given: bool) -> dict[str, bool]:
        response = self.client.put(f"/v1/profiles/{visitor_id}/consent", json=given)
        assert response.status_code == 200, response.text
        resolved: dict[str, bool] = response.json()["consent"]
        return resolved


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    namespace = unique_name("consent")
    settings = ProfileSettings(
        data_dir=tmp_path_factory.mktemp("consent"),
        redis_url=REDIS_URL,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        consent_personalization="opt_in",  # a strict shop: no profile until the visitor agrees
        aggregator_enabled=False,  # folded explicitly by the tests
    )
    with TestClient(create_app(settings)) as client:
        client.app.state.profile.repository.upsert_catalog([make_item(item_id="c-item")])  # type: ignore[attr-defined]
        yield Shop(settings, client)
    clean_namespace(REDIS_URL, namespace)


def test_consent_record_resolves_against_defaults() -> None:
    strict = ConsentDefaults(personalization="opt_in", analytics="opt_in", marketing="opt_in")
    lenient = ConsentDefaults(personalization="opt_out", analytics="opt_out", marketing="opt_out")
    nothing = Consent()
    assert not any(nothing.resolved(strict).values()) and all(nothing.resolved(lenient).values())
    given = nothing.merged({"marketing_whatsapp": True, "personalization": False}, 5.0)
    assert given.resolved(strict)["marketing_whatsapp"] and not given.resolved(strict)["marketing_push"]
    assert not given.resolved(lenient)["personalization"] and given.resolved(lenient)["analytics"]
    assert Consent.from_bytes(given.to_bytes()) == given
    assert consent_changes_from_properties({"consent_analytics": False, "consent_marketing_email": "yes"}) == {
        "analytics": False  # only booleans count
    }
    assert set(given.resolved(strict)) == set(PURPOSES)


def test_opt_in_default_keeps_no_profile_until_consent(shop: Shop) -> None:
    shop.send(views("v-optin", 3))
    assert not shop.profile_kept("v-optin")
    assert shop.client.get("/v1/profiles/v-optin").status_code == 404  # nothing is kept about them
    resolved = shop.consent("v-optin", personalization=True)
    assert resolved["personalization"] and resolved["analytics"]  # analytics defaults to opt-out
    assert not any(resolved[p] for p in PURPOSES if p.startswith("marketing_"))  # marketing: opt-in
    shop.send(views("v-optin", 2, start=1))
    assert shop.profile_kept("v-optin")
    # Consent is not retroactive: only the events after it were profiled.
    assert shop.state.repository.visitor_states(["v-optin"])["v-optin"].event_count == 2
    profile = shop.client.get("/v1/profiles/v-optin").json()
    assert profile["consent"]["personalization"] is True
    assert profile["features"]["event_count"] == 2 and profile["segments"]["lifecycle"]


def test_withdrawal_by_api_deletes_the_profile_and_keeps_the_choice(shop: Shop) -> None:
    shop.consent("v-api", personalization=True)
    shop.send(views("v-api", 4))
    assert shop.profile_kept("v-api")
    resolved = shop.consent("v-api", personalization=False, marketing_email=True)
    assert resolved["personalization"] is False and resolved["marketing_email"] is True
    assert not shop.profile_kept("v-api")  # state and online row are gone at once
    shop.send(views("v-api", 3, start=2))
    assert not shop.profile_kept("v-api")  # and nothing new is profiled
    profile = shop.client.get("/v1/profiles/v-api").json()  # the consent record is what remains
    assert profile["consent"]["personalization"] is False and profile["consent"]["marketing_email"] is True
    assert profile["features"]["event_count"] is None and profile["persona"] is None


def test_consent_by_profile_update_events(shop: Shop) -> None:
    shop.send([profile_update("v-event", 0, consent_personalization=True, tier="gold"), *views("v-event", 3, 0.1)])
    assert shop.profile_kept("v-event")
    assert shop.state.repository.visitor_states(["v-event"])["v-event"].traits == {"tier": "gold"}
    # Withdrawn in the middle of a batch: what came before in the batch is dropped too.
    shop.send(
        [
            *views("v-event", 2, start=1),
            profile_update("v-event", 1.5, consent_personalization=False, consent_marketing_push=True),
            *views("v-event", 2, start=2),
        ]
    )
    assert not shop.profile_kept("v-event")
    consent = shop.state.repository.consents(["v-event"])["v-event"]
    assert consent.given == {"personalization": False, "marketing_push": True}
    # The offline history holds only the rows made while consent was given (erasure removes those too).
    history = pq.read_table(shop.settings.offline_dir / F.VISITOR_VIEW, columns=[F.VISITOR_KEY])
    assert history[F.VISITOR_KEY].to_pylist().count("v-event") == 4  # the first profile_update and 3 views


# ------------------------------------------------------------------------------------------------ serving


@dataclass
class Serving:
    profile: TestClient
    recommend: TestClient
    visitor_id: str


@pytest.fixture(scope="module")
def serving(world: SessionWorld, world_fork: CommonSettings) -> Iterator[Serving]:
    """Both services on a copy of the demo world, and a fresh visitor (page views and searches only). A copy,
    so the visitor, their events and their consent record never reach the world other tests count (erasing
    the visitor at the end left the consent record behind)."""
    profile_settings = ProfileSettings(**world_fork.model_dump(), aggregator_enabled=False)
    recommend_settings = RecommendSettings(**world_fork.model_dump(), log_impressions=False, refresh_interval_s=3600)
    visitor_id = f"consent-{uuid.uuid4().hex[:8]}"
    with (
        TestClient(create_app(profile_settings, world.clock)) as profile,
        TestClient(create_recommend_app(recommend_settings, world.clock)) as rec,
    ):
        yield Serving(profile, rec, visitor_id)


@pytest.mark.slow
def test_without_personalization_consent_the_visitor_gets_the_generic_ranking(serving: Serving) -> None:
    state = serving.profile.app.state.profile  # type: ignore[attr-defined]
    now = BASE_TIME.isoformat()
    events = [
        Event.model_validate(
            make_event_dict(visitor_id=serving.visitor_id, type=kind, item_id=None, price=None, query="sepatu", **t)
        )
        for kind, t in [("page_view", {}), ("search", {}), ("page_view", {}), ("search", {})]
    ]
    state.ingest.ingest(events)
    while state.aggregator.run_once(5000).events:
        pass

    def recommend(visitor_id: str) -> dict[str, Any]:
        body = {
            "visitor_id": visitor_id,
            "context": {"device": "mobile", "city": "Jakarta", "now": now},
            "slots": [{"name": "home", "kind": "product", "count": 8}],
        }
        response = serving.recommend.post("/v1/recommend", json=body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def items(result: dict[str, Any]) -> list[str]:
        return [item["item_id"] for item in result["slots"][0]["items"]]

    generic = recommend(f"anonymous-{uuid.uuid4().hex[:8]}")
    assert generic["strategy"] == "popular_in_context" and items(generic)
    assert recommend(serving.visitor_id)["strategy"] == "personalized"  # known visitor, model loaded

    assert serving.profile.put(f"/v1/profiles/{serving.visitor_id}/consent", json={"personalization": False}).is_success
    refused = recommend(serving.visitor_id)
    assert refused["strategy"] == "generic_no_consent"
    assert items(refused) == items(generic)  # exactly the ranking an unknown visitor gets
    assert state.repository.visitor_states([serving.visitor_id]) == {}


@pytest.mark.slow
def test_without_marketing_consent_no_message_is_proposed(serving: Serving) -> None:
    def decide(channel: str) -> dict[str, Any]:
        body = {"visitor_id": serving.visitor_id, "channel": channel, "dry_run": True}
        response = serving.recommend.post("/v1/next-best-message", json=body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    for channel in ("push", "email", "whatsapp"):  # marketing is opt-in by default
        answer = decide(channel)
        assert (answer["action"], answer["reason"]) == ("none", "no_consent")
    put = serving.profile.put(f"/v1/profiles/{serving.visitor_id}/consent", json={"marketing_whatsapp": True})
    assert put.json()["consent"]["marketing_whatsapp"] is True
    assert decide("whatsapp")["reason"] != "no_consent"  # now other rules decide
    assert decide("email")["reason"] == "no_consent"  # consent is per channel


# ------------------------------------------------------------------------------------------------ races


def test_choices_merge_per_purpose_by_time_whatever_the_order() -> None:
    api = Consent().merged({"marketing_email": True, "personalization": False}, 200.0)
    late_event = Consent().merged({"marketing_email": False, "marketing_push": True}, 100.0)
    both = {"marketing_email": True, "personalization": False, "marketing_push": True}
    assert api.combined(late_event).given == late_event.combined(api).given == both
    assert api.combined(late_event).time_of("marketing_push") == 100.0
    # Same moment: refusal wins (the privacy-safe side), from either side.
    assert Consent().merged({"analytics": True}, 5.0).merged({"analytics": False}, 5.0).given == {"analytics": False}
    assert Consent().merged({"analytics": False}, 5.0).merged({"analytics": True}, 5.0).given == {"analytics": False}
    # A record written before per-purpose times existed dates its choices at `updated_at`.
    old = Consent.from_bytes(b'{"given": {"analytics": true}, "updated_at": 50.0}')
    assert old.time_of("analytics") == 50.0 and old.merged({"analytics": False}, 40.0).given == {"analytics": True}


def test_a_late_profile_update_never_overrides_a_newer_explicit_choice(shop: Shop) -> None:
    shop.consent("v-late", personalization=True, marketing_push=False)  # now (the service's clock)
    shop.send([profile_update("v-late", 0, consent_personalization=False, consent_marketing_push=True)])  # Nov 20
    assert shop.state.repository.consents(["v-late"])["v-late"].given == {
        "personalization": True,
        "marketing_push": False,
    }
    shop.send(views("v-late", 2, start=1))
    assert shop.profile_kept("v-late")


def test_the_consent_api_racing_the_aggregator_loses_no_choice(shop: Shop) -> None:
    """Every round the aggregator folds an (older) `profile_update` while the API stores a newer choice at the
    same moment: the record ends with the API's choice and the event's other purpose, whatever the
    interleaving."""
    errors: list[BaseException] = []
    for round_ in range(25):
        visitor_id = f"v-race-{round_}"
        event = profile_update(visitor_id, 0, consent_marketing_email=False, consent_marketing_push=True)
        start = threading.Barrier(2)

        def fold(event: Event = event, start: threading.Barrier = start) -> None:
            try:
                shop.state.ingest.ingest([event])
                start.wait()
                while shop.state.aggregator.run_once(5000).events:
                    pass
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        folder = threading.Thread(target=fold)
        folder.start()
        start.wait()
        time.sleep(round_ % 5 * 0.002)  # vary the interleaving
        shop.consent(visitor_id, marketing_email=True)
        folder.join(30)
        assert not errors
        stored = shop.state.repository.consents([visitor_id])[visitor_id]
        assert stored.given == {"marketing_email": True, "marketing_push": True}, f"round {round_}"


def test_training_leaves_out_visitors_who_refuse_analytics(shop: Shop) -> None:
    shop.send(views("v-stats-yes", 2) + views("v-stats-no", 2) + views("v-stats-given", 2))
    shop.consent("v-stats-no", analytics=False)
    shop.consent("v-stats-given", analytics=True)
    repository = RecommendRepository(shop.state.repository.store, shop.state.repository.feature_store)

    def trained_on(default: Any) -> set[str]:
        events, _ = Trainer(repository, TrainConfig(analytics_default=default)).load()
        return {e.visitor_id for e in events} & {"v-stats-yes", "v-stats-no", "v-stats-given"}

    assert trained_on("opt_out") == {"v-stats-yes", "v-stats-given"}
    assert trained_on("opt_in") == {"v-stats-given"}  # a strict shop: only those who said yes
