"""Next-best message end to end on real Redis and Feast: events -> profile aggregator -> Feast rows -> the
recommend app's `/v1/next-best-message` and `:batch`. Covers each trigger, tone, quiet hours across time
zones, caps, cooldowns, consent, the batch endpoint, the "none" answers and the decision log."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from services.common.catalog import CatalogItem
from services.common.clock import FixedClock
from services.common.consent import ConsentDefaults
from services.common.events import Event
from services.common.models import ModelKind, ModelRegistry
from services.common.settings import CommonSettings
from services.demo.shop import generate_shop
from services.features.aggregations import SegmentRules
from services.messages.endpoints import install_message_service
from services.messages.history import SendHistory
from services.messages.model import MessageModel, Stage
from services.messages.repository import MessageRepository
from services.messages.schemas import MessageRequest
from services.messages.service import MessageService
from services.messages.settings import MessageSettings
from services.messages.templates import MessageCatalog
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.privacy.repository import MessageHistoryHolder
from services.profile.repository import ProfileRepository
from services.recommend.app import create_app
from services.recommend.deps import RecommendState
from services.recommend.settings import RecommendSettings
from tests.conftest import REDIS_URL, clean_namespace, unique_name
from tests.factories import make_event, make_item

NOW = datetime(2026, 11, 20, 3, tzinfo=UTC)  # Friday the 20th, 10:00 in Jakarta (WIB): no payday
PAYDAY = datetime(2026, 11, 26, 3, tzinfo=UTC)
# Deterministic policy for assertions: no control group, no exploration (the first eligible message wins).
DETERMINISTIC = MessageSettings(control_rate=0.0, exploration=0.0, cold_start_exploration=0.0)
CONSENT_ALL = {"consent_marketing_push": True, "consent_marketing_email": True, "consent_marketing_whatsapp": True}


def ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).isoformat()


def products() -> list[CatalogItem]:
    old = (NOW - timedelta(days=200)).isoformat()
    return [
        make_item(item_id="p-cart", title="Kemeja Flanel", price=150_000, created_at=old),
        make_item(item_id="p-drop", title="Jaket Denim", price=70_000, original_price=100_000, created_at=old),
        make_item(item_id="p-restock", title="Sepatu Kanvas", stock=0, created_at=old),
        make_item(item_id="p-new", title="Kaos Polos", created_at=ago(days=2)),
        make_item(item_id="p-old", title="Celana Chino", created_at=old),
        make_item(item_id="p-gadget", title="Kabel USB-C", category="aksesoris-gadget", created_at=old),
    ]


def visitor_events() -> list[Event]:
    def ctx(city: str = "Jakarta", locale: str = "id", session: str = "s1") -> dict[str, Any]:
        return {"device": "mobile", "channel": "web", "city": city, "locale": locale, "session_id": session}

    def profile(visitor: str, first_name: str, consent: dict[str, bool] | None = None) -> Event:
        return make_event(
            visitor_id=visitor,
            type="profile_update",
            item_id=None,
            price=None,
            timestamp=ago(days=60),
            properties={"first_name": first_name, **(CONSENT_ALL if consent is None else consent)},
        )

    events = [
        profile("cart", "putri"),
        profile("fresh-cart", "Budi"),
        profile("dropper", "Sari"),
        profile("restocker", "Agus"),
        profile("fan", "Dewi"),
        profile("dormant", "Eko"),
        profile("loyal", "Rina"),
        profile("papuan", "Yohanes"),
        profile("english", "Kevin"),
        profile("researcher", "Ayu"),
        profile("capper", "Andi"),
        profile("batcher", "Citra"),
        profile("racer", "Rudi"),
        profile("refuser", "Joko", {"consent_marketing_push": False, "consent_marketing_email": True}),
        # "silent" never says anything about consent: marketing is opt-in by default.
    ]
    for visitor, city, locale in (
        ("cart", "Jakarta", "id"),
        ("papuan", "Jayapura", "id"),
        ("english", "Jakarta", "en"),
        ("capper", "Jakarta", "id"),
        ("batcher", "Jakarta", "id"),
        ("racer", "Jakarta", "id"),
        ("refuser", "Jakarta", "id"),
        ("silent", "Jakarta", "id"),
    ):
        events += [
            make_event(
                visitor_id=visitor, item_id="p-cart", timestamp=ago(hours=3, minutes=5), context=ctx(city, locale)
            ),
            make_event(
                visitor_id=visitor,
                type="add_to_cart",
                item_id="p-cart",
                timestamp=ago(hours=3),
                context=ctx(city, locale),
            ),
        ]
    events += [
        make_event(visitor_id="fresh-cart", type="add_to_cart", item_id="p-cart", timestamp=ago(minutes=20)),
        make_event(visitor_id="dropper", item_id="p-drop", timestamp=ago(hours=5)),
        make_event(visitor_id="restocker", item_id="p-restock", timestamp=ago(days=1)),
        make_event(visitor_id="fan", item_id="p-old", timestamp=ago(days=1)),
        make_event(visitor_id="dormant", item_id="p-old", timestamp=ago(days=40)),
    ]
    for day in (9, 6, 3):  # three orders in separate sessions: a loyal customer
        session = ctx(session=f"loyal-{day}")
        events += [
            make_event(visitor_id="loyal", item_id="p-gadget", timestamp=ago(days=day, minutes=5), context=session),
            make_event(
                visitor_id="loyal", type="purchase", item_id="p-gadget", timestamp=ago(days=day), context=session
            ),
        ]
    for minute in range(15):  # one long session: a careful researcher
        item = "p-old" if minute % 2 else "p-gadget"
        events.append(make_event(visitor_id="researcher", item_id=item, timestamp=ago(hours=6, minutes=60 - minute)))
    events.append(make_event(visitor_id="researcher", type="add_to_cart", item_id="p-cart", timestamp=ago(hours=4)))
    return sorted(events, key=lambda e: e.ts)


@dataclass
class Shop:
    client: TestClient
    state: RecommendState
    settings: RecommendSettings

    def service(self, settings: MessageSettings = DETERMINISTIC, **kwargs: Any) -> MessageService:
        state = self.state
        return MessageService(
            MessageRepository(state.repository),
            lambda: state.service.snapshot,
            settings,
            kwargs.pop("consent_defaults", state.settings.consent_defaults()),
            clock=state.service.clock,
            **kwargs,
        )

    def use(self, service: MessageService) -> MessageService:
        install_message_service(self.client.app, service)  # type: ignore[arg-type]
        return service

    def ask(self, visitor: str, channel: str = "push", now: datetime = NOW, **extra: Any) -> dict[str, Any]:
        body = {"visitor_id": visitor, "channel": channel, "now": now.isoformat(), **extra}
        response = self.client.post("/v1/next-best-message", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def preview(self, visitor: str, channel: str = "push", now: datetime = NOW) -> dict[str, Any]:
        return self.ask(visitor, channel, now, dry_run=True, explain=True)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    namespace = unique_name("nbm")
    common = CommonSettings(
        data_dir=Path(tmp_path_factory.mktemp("nbm")),
        redis_url=REDIS_URL,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        redis_timeout_s=5.0,
        clock_start=NOW,  # the services' clock starts at the test's NOW (and runs at wall speed)
    )
    profile = ProfileRepository.open(common)
    try:
        profile.upsert_catalog([*products(), *generate_shop(seed=3, n_products=10, now=NOW).messages])
        IngestService(profile).ingest(visitor_events())
        aggregator = Aggregator(
            profile, SegmentRules(), common.consent_defaults(), offline_rows=False, clock=FixedClock(NOW)
        )
        while aggregator.run_once(5000).events:
            pass
        # A persona visitor: rows assigned to persona 7, described as careful researchers.
        IngestService(profile).ingest(
            [make_event(visitor_id="persona", type="profile_update", item_id=None, price=None, timestamp=ago(days=9),
                        properties={"first_name": "Maya", **CONSENT_ALL}),
             make_event(visitor_id="persona", type="add_to_cart", item_id="p-cart", timestamp=ago(hours=3))]
        )  # fmt: skip
        with_persona = Aggregator(
            profile,
            SegmentRules(),
            common.consent_defaults(),
            offline_rows=False,
            persona_assigner=lambda row: 7,
            clock=FixedClock(NOW),
        )
        while with_persona.run_once(5000).events:
            pass
        personas = {
            "personas": [
                {
                    "persona_id": 7,
                    "name_en": "Careful Researcher",
                    "top_traits": [{"trait": "session_depth", "value": 18.0, "population_mean": 5.0, "ratio": 3.6}],
                }
            ]
        }
        ModelRegistry(profile.store).publish(ModelKind.PERSONAS, "7", orjson.dumps(personas), created_at=0.0)
    finally:
        profile.close()
    settings = RecommendSettings(**common.model_dump(), refresh_interval_s=1.0)
    app = create_app(settings)
    with TestClient(app) as client:
        state: RecommendState = app.state.recommend
        deadline = time.monotonic() + 20
        while state.service.snapshot.size == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        shop = Shop(client, state, settings)
        shop.use(shop.service())
        yield shop
    clean_namespace(REDIS_URL, namespace)
    drop_feast_rows(REDIS_URL, namespace)


def drop_feast_rows(url: str, project: str) -> None:
    """Feast's Redis keys end with the project name (not under the namespace prefix): remove them too."""
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"*{project}", count=5000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    client.close()


def constant_model(p_open: float) -> MessageModel:
    """A model whose stages are constant rates (what training stores when data is thin)."""
    stages = {"open": Stage(None, p_open), "click": Stage(None, 0.5), "purchase": Stage(None, 0.5)}
    return MessageModel("const", 0.0, {**stages, "baseline": Stage(None, 0.2)}, 24.0)


def triggers(answer: dict[str, Any]) -> dict[str, str | None]:
    return {c["trigger"]: c["product_id"] for c in answer.get("candidates", [])}


# -- triggers ---------------------------------------------------------------------------------------------


def test_cart_abandonment_needs_a_cart_older_than_an_hour(shop: Shop) -> None:
    assert triggers(shop.preview("cart"))["cart_abandonment"] == "p-cart"
    fresh = shop.preview("fresh-cart")
    assert "cart_abandonment" not in triggers(fresh)


def test_price_drop_new_arrivals_win_back_loyalty_and_payday(shop: Shop) -> None:
    assert triggers(shop.preview("dropper"))["price_drop"] == "p-drop"
    assert triggers(shop.preview("fan"))["new_arrivals"] == "p-new"
    dormant = shop.preview("dormant", "whatsapp")
    assert "win_back" in triggers(dormant) and "win_back" not in triggers(shop.preview("fan", "whatsapp"))
    assert "loyalty_reward" in triggers(shop.preview("loyal", "email"))
    assert "loyalty_reward" not in triggers(shop.preview("cart", "email"))
    assert "payday_promo" in triggers(shop.preview("cart", now=PAYDAY + timedelta(hours=2)))
    assert "payday_promo" not in triggers(shop.preview("cart"))


def test_back_in_stock_once_a_sold_out_viewed_product_returns(shop: Shop) -> None:
    assert "back_in_stock" not in triggers(shop.preview("restocker"))  # the watch now knows it is sold out
    restocked = next(p for p in products() if p.item_id == "p-restock").model_copy(update={"stock": 8})
    response = shop.client.put("/v1/catalog/items", json={"items": [restocked.model_dump(mode="json")]})
    assert response.status_code == 200, response.text
    assert shop.client.post("/v1/admin/reload").status_code == 200  # rebuilds the item cache now
    snapshot = shop.state.service.snapshot
    assert snapshot.available[snapshot.index["p-restock"]]
    assert triggers(shop.preview("restocker"))["back_in_stock"] == "p-restock"


# -- the chosen message: rendering, tone, send time ---------------------------------------------------------------


def test_a_send_answer_is_rendered_for_the_visitor(shop: Shop) -> None:
    answer = shop.ask("cart", "whatsapp", dry_run=True)
    assert answer["action"] == "send" and answer["recommendation_id"]
    message = answer["message"]
    assert message["item_id"] == "m002" and message["trigger"] == "cart_abandonment"
    assert (message["locale"], message["tone"]) == ("id", "short")
    assert message["title"] == "Lanjutkan belanjamu"
    assert message["body"] == "Hai Putri, Kemeja Flanel tinggal selangkah lagi."
    assert message["deep_link"] == "selaras://product/p-cart"
    assert answer["product"]["item_id"] == "p-cart" and answer["product"]["price"] == 150_000
    send_at = datetime.fromisoformat(answer["send_at"])
    assert send_at >= NOW and 8 <= send_at.hour < 21 and send_at.utcoffset() == timedelta(hours=7)
    assert any("cart with 1 item left 3 hours ago" in reason for reason in answer["reasons"])
    assert answer["experiment"] is None and answer["model_version"] is None
    spec = shop.client.app.openapi()  # type: ignore[attr-defined]
    jsonschema.validate(answer, {"components": spec["components"], "$ref": "#/components/schemas/MessageDecision"})


def test_locale_and_tone_follow_the_visitor(shop: Shop) -> None:
    english = shop.ask("english", "whatsapp", dry_run=True)["message"]
    assert (english["locale"], english["title"]) == ("en", "Finish your order")
    researcher = shop.ask("researcher", "whatsapp", dry_run=True)
    assert researcher["message"]["tone"] == "detailed"
    assert researcher["message"]["title"] == "Hai Ayu, ada yang tertinggal"
    assert "Stoknya terbatas" in researcher["message"]["body"]
    persona = shop.ask("persona", "whatsapp", dry_run=True)
    assert persona["message"]["tone"] == "detailed"
    assert any("persona Careful Researcher" in reason for reason in persona["reasons"])


def test_quiet_hours_across_time_zones(shop: Shop) -> None:
    evening = datetime(2026, 11, 20, 13, 30, tzinfo=UTC)  # 20:30 in Jakarta, 22:30 in Jayapura (WIT)
    jakarta = shop.ask("cart", "push", evening, dry_run=True)
    assert jakarta["action"] == "send"
    assert datetime.fromisoformat(jakarta["send_at"]) == evening  # hour 20 is still open: send now
    papua = shop.ask("papuan", "push", evening, dry_run=True)
    assert (papua["action"], papua["reason"]) == ("none", "quiet_hours")
    morning = datetime(2026, 11, 20, 22, 30, tzinfo=UTC)  # 05:30 WIB / 07:30 WIT on the 21st: wait until 08:00
    papua_morning = shop.ask("papuan", "push", morning, dry_run=True)
    assert datetime.fromisoformat(papua_morning["send_at"]).hour >= 8


# -- caps, cooldowns, consent, none answers -------------------------------------------------------------------------


def test_caps_per_channel_and_across_channels_then_cooldown(shop: Shop) -> None:
    first = shop.ask("capper", "push")
    assert first["action"] == "send" and first["message"]["item_id"] == "m001"
    again = shop.ask("capper", "push")
    assert (again["action"], again["reason"]) == ("none", "frequency_cap") and "channel_day" in again["detail"]
    email = shop.ask("capper", "email")
    assert email["action"] == "send" and email["message"]["item_id"] == "m002"
    third = shop.ask("capper", "whatsapp")
    assert (third["reason"], third["detail"]) == ("frequency_cap", "total_day cap reached")
    # Next day the caps are free again, but the WhatsApp/e-mail cart reminder cools down for 48 hours.
    tomorrow = shop.ask("capper", "whatsapp", NOW + timedelta(days=1))
    assert (tomorrow["action"], tomorrow["reason"]) == ("none", "cooldown")
    # The decisions were logged as message_sent events with their propensity and candidates.
    shop.state.repository.flush()
    sent = {
        e.recommendation_id: e
        for e in shop.state.repository.logged_events()
        if e.type.value == "message_sent" and e.visitor_id == "capper"
    }
    logged = sent[first["recommendation_id"]]
    assert logged.event_id == f"msg:{first['recommendation_id']}" and logged.item_id == "m001"
    assert logged.properties["propensity"] == 1.0 and logged.properties["action"] == "send"
    assert "m001:p-cart" in str(logged.properties["candidates"])
    assert set(sent) == {first["recommendation_id"], email["recommendation_id"]}  # refusals are not decisions


def test_concurrent_requests_for_one_visitor_send_no_more_than_the_caps_allow(shop: Shop) -> None:
    """Caps are checked and consumed in one step on the stored history: 12 decisions racing for one visitor
    (threads of one process here; replicas race the same way through Redis) send exactly once."""
    service = shop.service()
    start = threading.Barrier(12)

    def decide(_: int) -> dict[str, Any]:
        start.wait()
        return service.decide(MessageRequest(visitor_id="racer", channel="push", now=NOW))

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(decide, range(12)))
    sent = [a for a in answers if a["action"] == "send"]
    assert len(sent) == 1, [(a["action"], a.get("reason")) for a in answers]
    assert {a["reason"] for a in answers if a["action"] != "send"} <= {"frequency_cap", "cooldown"}
    stored = SendHistory.from_bytes(MessageRepository(shop.state.repository).histories(["racer"])[0])
    assert [(channel, template) for _, channel, template in stored.sends] == [("push", sent[0]["message"]["item_id"])]


def test_record_send_consumes_a_cap_of_k_exactly_k_times_under_contention(shop: Shop) -> None:
    """The repository's compare-and-set with a cap of 3 a day: 12 threads, each with a message template of
    its own, record exactly 3 sends (a read-then-write across threads recorded up to 12, losing some)."""
    repository = MessageRepository(shop.state.repository)
    templates = MessageCatalog.build(shop.state.service.snapshot, 0.1).templates
    assert len(templates) >= 3
    settings = DETERMINISTIC.model_copy(update={"cap_channel_day": 3, "cap_total_day": 3})
    send_at = NOW + timedelta(hours=10)
    start = threading.Barrier(12)

    def record(i: int) -> str | None:
        template = templates[i % len(templates)]
        start.wait()
        refused, _ = repository.record_send(
            "cap-contender",
            lambda history: history.try_send("push", send_at, template, settings),
            NOW.timestamp(),
            14 * 86_400,
            30 * 86_400,
        )
        return refused

    with ThreadPoolExecutor(12) as pool:
        refusals = list(pool.map(record, range(12)))
    assert refusals.count(None) == 3, refusals
    stored = SendHistory.from_bytes(repository.histories(["cap-contender"])[0])
    assert len(stored.sends) == 3 and len({template for _, _, template in stored.sends}) == 3


def test_consent_is_required_per_channel(shop: Shop) -> None:
    assert shop.ask("refuser", "push", dry_run=True)["reason"] == "no_consent"
    assert shop.ask("refuser", "email", dry_run=True)["action"] == "send"
    assert shop.ask("silent", "push", dry_run=True)["reason"] == "no_consent"  # opt-in by default
    opt_out = shop.service(consent_defaults=ConsentDefaults(marketing="opt_out"))
    assert opt_out.decide(MessageRequest(visitor_id="silent", channel="push", now=NOW))["action"] == "send"
    assert opt_out.decide(MessageRequest(visitor_id="nobody", channel="push", now=NOW))["reason"] == "unknown_visitor"


def test_control_group_exploration_and_the_model_decide_with_logged_propensities(shop: Shop) -> None:
    control = shop.service(MessageSettings(control_rate=1.0))
    answer = control.decide(MessageRequest(visitor_id="dropper", channel="email", now=NOW))
    assert (answer["action"], answer["reason"]) == ("none", "control_group") and answer["recommendation_id"]
    shop.state.repository.flush()
    logged = next(
        e for e in shop.state.repository.logged_events() if e.recommendation_id == answer["recommendation_id"]
    )
    assert logged.item_id == "none" and logged.properties["action"] == "none"
    assert logged.properties["control"] is True and logged.properties["propensity"] == 1.0

    hopeless = shop.service()
    hopeless.use_model(constant_model(0.001))  # uplift 0.001 * 0.25 * 0.8 = 0.0002 < min_uplift
    nothing = hopeless.decide(MessageRequest(visitor_id="dropper", channel="push", now=NOW, dry_run=True))
    assert (nothing["action"], nothing["reason"]) == ("none", "no_expected_uplift")
    hopeful = shop.service(MessageSettings(control_rate=0.1, exploration=0.2))
    hopeful.use_model(constant_model(0.5))  # uplift 0.5 * 0.25 * 0.8 = 0.1
    sends = [
        hopeful.decide(MessageRequest(visitor_id="dropper", channel="push", now=NOW + timedelta(days=d), dry_run=True))
        for d in range(40)
    ]
    chosen = [s for s in sends if s["action"] == "send"]
    assert chosen and all(s["score"] == pytest.approx(0.1) for s in chosen)
    assert {s["reason"] for s in sends if s["action"] == "none"} <= {"control_group", "exploration"}
    k = len(hopeful.decide(MessageRequest(visitor_id="dropper", channel="push", now=NOW, dry_run=True, explain=True))[
        "candidates"])  # fmt: skip
    greedy = [s for s in chosen if not any("exploration" in r for r in s["reasons"])]
    assert greedy and greedy[0]["propensity"] == pytest.approx(0.9 * (0.8 + 0.2 / (k + 1)), abs=1e-6)


def test_experiment_arms_holdout_rules_and_model(shop: Shop) -> None:
    class Experiments:
        def __init__(self, arm: str, personalized: bool):
            self.arm, self.personalized = arm, personalized
            self.exposures: list[tuple[Any, ...]] = []

        def assign_message(self, visitor_id: str, channel: str, now: float) -> tuple[str, str, bool]:
            return ("nbm-test", self.arm, self.personalized)

        def record_message_exposure(self, *args: Any, **kwargs: Any) -> None:
            self.exposures.append((*args, kwargs["item_id"]))

    holdout = Experiments("holdout", False)
    answer = shop.service(experiments=holdout).decide(MessageRequest(visitor_id="cart", channel="push", now=NOW))
    assert (answer["reason"], answer["experiment"]) == ("experiment_holdout", {"key": "nbm-test", "arm": "holdout"})
    assert holdout.exposures == []
    # Under uniform exploration the model arm varies; the rules arm always sends the most urgent trigger.
    exploring = MessageSettings(control_rate=0.0, cold_start_exploration=1.0)
    days = [NOW + timedelta(days=d) for d in range(12)]
    rules = Experiments("rules", False)
    service = shop.service(exploring, experiments=rules)
    previews = [MessageRequest(visitor_id="researcher", channel="push", now=d, dry_run=True) for d in days]
    assert {service.decide(request)["message"]["trigger"] for request in previews} == {"cart_abandonment"}
    assert rules.exposures == []  # previews are not exposures
    sent = service.decide(MessageRequest(visitor_id="researcher", channel="push", now=NOW))
    assert sent["experiment"] == {"key": "nbm-test", "arm": "rules"}
    assert rules.exposures == [("researcher", "nbm-test", "rules", "push", sent["recommendation_id"], "m001")]
    model_arm = shop.service(exploring, experiments=Experiments("model", True))
    varied = [
        model_arm.decide(MessageRequest(visitor_id="researcher", channel="push", now=d, dry_run=True)) for d in days
    ]
    assert {a["message"]["trigger"] if a["action"] == "send" else "none" for a in varied} != {"cart_abandonment"}
    assert varied[0]["experiment"] == {"key": "nbm-test", "arm": "model"}


# -- batch and validation ---------------------------------------------------------------------------------------------


def test_batch_answers_in_order_and_keeps_caps_within_the_batch(shop: Shop) -> None:
    requests = [
        {"visitor_id": "batcher", "channel": "push", "now": NOW.isoformat()},
        {"visitor_id": "batcher", "channel": "push", "now": NOW.isoformat()},
        {"visitor_id": "silent", "channel": "push", "now": NOW.isoformat()},
        {"visitor_id": "dropper", "channel": "push", "now": NOW.isoformat(), "dry_run": True},
    ]
    response = shop.client.post("/v1/next-best-message:batch", json={"requests": requests})
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["visitor_id"] for r in results] == ["batcher", "batcher", "silent", "dropper"]
    assert results[0]["action"] == "send"
    assert (results[1]["reason"], results[2]["reason"]) == ("frequency_cap", "no_consent")
    assert results[3]["action"] == "send" and body["count"] == 4 and body["sent"] == 2
    # What the service sends is what its OpenAPI document says (generated clients parse these answers).
    spec = shop.client.app.openapi()  # type: ignore[attr-defined]
    documented = {"components": spec["components"]}
    jsonschema.validate(body, {**documented, "$ref": "#/components/schemas/MessageBatchAnswer"})
    for result in results:
        jsonschema.validate(result, {**documented, "$ref": "#/components/schemas/MessageDecision"})
    with pytest.raises(jsonschema.ValidationError):  # the check can fail: an answer without its action
        jsonschema.validate(
            {**results[0], "action": None}, {**documented, "$ref": "#/components/schemas/MessageDecision"}
        )


def test_batch_limits_and_validation_errors(shop: Shop) -> None:
    too_many = [{"visitor_id": f"v{i}", "channel": "push"} for i in range(1001)]
    response = shop.client.post("/v1/next-best-message:batch", json={"requests": too_many})
    assert response.status_code == 413 and response.json()["error"] == "PayloadTooLarge"
    bad = [{"visitor_id": "a", "channel": "push"}, {"visitor_id": "b", "channel": "sms"}]
    response = shop.client.post("/v1/next-best-message:batch", json={"requests": bad})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert errors[0]["index"] == 1 and errors[0]["field"] == "channel"
    assert shop.client.post("/v1/next-best-message:batch", json={"visitors": []}).status_code == 422
    single = shop.client.post("/v1/next-best-message", json={"channel": "push"})
    assert single.status_code == 422 and single.json()["errors"][0]["field"] == "visitor_id"


def test_send_history_is_exported_and_erased_for_privacy_requests(shop: Shop) -> None:
    answer = shop.ask("english", "email")
    assert answer["action"] == "send"
    holder = MessageHistoryHolder(shop.settings)
    exported = holder.export_visitor("english")
    assert exported["sends"] == [
        {"send_at": datetime.fromisoformat(answer["send_at"]).timestamp(), "channel": "email", "message": "m002"}
    ]
    assert holder.forget_visitor("english") == 1
    assert holder.export_visitor("english") is None
    assert shop.ask("english", "email")["action"] == "send"  # no history left: caps start over
