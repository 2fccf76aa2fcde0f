"""Next-best message, pure parts: send time and quiet hours across time zones, caps, cooldowns, eligibility
per trigger, tone, rendering."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.common.catalog import CatalogItem
from services.common.context import WIB, WIT, WITA
from services.demo.shop import generate_shop
from services.features.item_cache import ItemSnapshot, build_snapshot
from services.messages.eligibility import Candidate, Eligibility, StockWatch
from services.messages.history import SendHistory
from services.messages.model import VisitorView
from services.messages.render import deep_link, fill, format_price, render, tokens_for, tone_for
from services.messages.settings import MessageSettings
from services.messages.templates import MessageCatalog
from services.messages.timing import plan_send
from tests.factories import make_item

SETTINGS = MessageSettings()
EVENING_PEAK = [0.0] * 24
EVENING_PEAK[20], EVENING_PEAK[22], EVENING_PEAK[10] = 0.3, 0.5, 0.1  # most active at 22:00 (quiet)


def at(year: int, month: int, day: int, hour: int, minute: int = 0, zone: Any = UTC) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=zone)


# -- send time and quiet hours ---------------------------------------------------------------------------


def test_send_time_is_the_most_active_hour_outside_quiet_hours_in_each_zone() -> None:
    now = at(2026, 11, 20, 3).timestamp()  # 10:00 WIB, 11:00 WITA, 12:00 WIT
    for zone in (WIB, WITA, WIT):
        send_at = plan_send(now, zone, EVENING_PEAK, SETTINGS)
        assert send_at is not None
        # 22:00 is the visitor's peak but quiet; 20:00 is the best hour left, in the visitor's own zone.
        assert (send_at.hour, send_at.minute, send_at.utcoffset()) == (20, 0, zone.utcoffset(None))
    assert plan_send(now, WIB, EVENING_PEAK, SETTINGS.model_copy(update={"respect_quiet_hours": False})).hour == 22


def test_quiet_hours_differ_between_jakarta_and_jayapura_at_the_same_instant() -> None:
    now = at(2026, 11, 20, 12, 30).timestamp()  # 19:30 in Jakarta (WIB), 21:30 in Jayapura (WIT)
    jakarta = plan_send(now, WIB, EVENING_PEAK, SETTINGS)
    assert jakarta is not None and jakarta == at(2026, 11, 20, 20, zone=WIB)
    assert plan_send(now, WIT, EVENING_PEAK, SETTINGS) is None  # quiet until tomorrow: no slot left today
    assert plan_send(now, WITA, EVENING_PEAK, SETTINGS) is not None  # 20:30 WITA: still inside hour 20


def test_send_now_when_the_current_hour_is_best_and_early_morning_waits_for_the_end_of_quiet_hours() -> None:
    now = at(2026, 11, 20, 13, 15).timestamp()  # 20:15 WIB
    assert plan_send(now, WIB, EVENING_PEAK, SETTINGS) == datetime.fromtimestamp(now, WIB)
    early = at(2026, 11, 19, 23).timestamp()  # 06:00 WIB on the 20th, quiet until 08:00
    send_at = plan_send(early, WIB, [0.0] * 24, SETTINGS)  # unknown habits: the default hour
    assert send_at == at(2026, 11, 20, 19, zone=WIB)
    assert plan_send(early, WIB, [1.0] + [0.0] * 23, SETTINGS) == at(2026, 11, 20, 8, zone=WIB)  # first open hour


def test_quiet_hours_can_be_a_window_inside_the_day() -> None:
    settings = MessageSettings(quiet_start_hour=12, quiet_end_hour=14)
    lunch = [0.0] * 24
    lunch[12], lunch[15] = 1.0, 0.5
    send_at = plan_send(at(2026, 11, 20, 2).timestamp(), WIB, lunch, settings)  # 09:00 WIB
    assert send_at is not None and send_at.hour == 15


# -- caps and cooldowns --------------------------------------------------------------------------------------


def test_frequency_caps_per_channel_and_across_channels_per_day_and_week() -> None:
    settings = MessageSettings(cap_channel_day=1, cap_total_day=2, cap_channel_week=3, cap_total_week=4)
    history = SendHistory()
    monday = at(2026, 11, 16, 19, zone=WIB)
    assert history.cap_reached("push", monday, settings) is None
    history.record(monday.timestamp(), "push", "m001")
    assert history.cap_reached("push", monday, settings) == "channel_day"
    assert history.cap_reached("email", monday, settings) is None
    history.record(monday.timestamp(), "email", "m006")
    assert history.cap_reached("whatsapp", monday, settings) == "total_day"
    tuesday = monday + timedelta(days=1)
    assert history.cap_reached("push", tuesday, settings) is None
    history.record(tuesday.timestamp(), "push", "m003")
    wednesday = tuesday + timedelta(days=1)
    history.record(wednesday.timestamp(), "push", "m007")
    thursday = wednesday + timedelta(days=1)
    assert history.cap_reached("push", thursday, settings) == "channel_week"  # 3 pushes in 7 days
    assert history.cap_reached("email", thursday, settings) == "total_week"  # 4 messages in 7 days
    assert history.cap_reached("push", monday + timedelta(days=7, hours=1), settings) is None  # a week later


def test_the_day_cap_counts_the_visitors_local_calendar_day() -> None:
    history = SendHistory()
    late = at(2026, 11, 16, 20, 30, zone=WIT)  # 20:30 in Jayapura on the 16th
    history.record(late.timestamp(), "push", "m001")
    next_morning = at(2026, 11, 17, 9, zone=WIT)  # 12.5 hours later, but another local day
    assert history.cap_reached("push", next_morning, SETTINGS) is None
    same_day = at(2026, 11, 16, 20, 45, zone=WIT)
    assert history.cap_reached("push", same_day, SETTINGS) == "channel_day"


def test_history_round_trips_and_drops_what_no_longer_matters() -> None:
    history = SendHistory()
    now = at(2026, 11, 20, 12).timestamp()
    history.record(now - 30 * 86_400, "push", "m001")
    history.record(now - 3600, "email", "m006")
    again = SendHistory.from_bytes(history.to_bytes(now, keep_s=14 * 86_400))
    assert again.sends == [(now - 3600, "email", "m006")]
    assert again.last == {"m006": now - 3600}


# -- eligibility per trigger -----------------------------------------------------------------------------------

NOW = at(2026, 11, 20, 3)  # 10:00 WIB on the 20th: not a payday


@pytest.fixture(scope="module")
def messages() -> list[CatalogItem]:
    return generate_shop(seed=3, n_products=10, now=NOW).messages


def product(item_id: str, **overrides: Any) -> CatalogItem:
    return make_item(item_id=item_id, **overrides)


def snapshot_of(items: list[CatalogItem]) -> ItemSnapshot:
    return build_snapshot(items, {}, {}, {}, now=NOW.timestamp())


def view(**row: Any) -> VisitorView:
    base: dict[str, Any] = {
        "event_count": 10,
        "city": "Jakarta",
        "locale": "id",
        "last_seen_ts": NOW.timestamp() - 3600,
        "hour_histogram": EVENING_PEAK,
        "top_categories": ["fashion-pria"],
        "top_category_scores": [1.0],
    }
    base.update(row)
    return VisitorView.from_row("visitor-1", base)


def triggers(
    items: list[CatalogItem], visitor: VisitorView, channel: str = "push", now: datetime = NOW, watch: Any = None
) -> dict[str, str | None]:
    snapshot = snapshot_of(items)
    catalog = MessageCatalog.build(snapshot, SETTINGS.min_discount)
    watch = watch or StockWatch(None)
    watch.observe(snapshot, now.timestamp(), 7 * 86_400)
    send_at = plan_send(now.timestamp(), visitor.zone, visitor.histogram, SETTINGS)
    assert send_at is not None
    found = Eligibility(catalog, watch, SETTINGS).candidates(visitor, channel, now.timestamp(), send_at)
    return {c.template.trigger: (snapshot.ids[c.product] if c.product >= 0 else None) for c in found}


def test_cart_abandonment_needs_an_open_cart_older_than_an_hour(messages: list[CatalogItem]) -> None:
    items = [product("p-cart"), *messages]
    fresh = view(cart_items=["p-cart"], cart_updated_ts=NOW.timestamp() - 20 * 60)
    assert "cart_abandonment" not in triggers(items, fresh)
    stale = view(cart_items=["p-cart"], cart_updated_ts=NOW.timestamp() - 3 * 3600)
    assert triggers(items, stale)["cart_abandonment"] == "p-cart"
    assert triggers(items, stale, channel="whatsapp")["cart_abandonment"] == "p-cart"
    sold_out = [product("p-cart", stock=0), *messages]
    assert "cart_abandonment" not in triggers(sold_out, stale)


def test_price_drop_on_a_viewed_product_needs_a_real_discount(messages: list[CatalogItem]) -> None:
    items = [
        product("p-small", price=95_000, original_price=100_000),
        product("p-big", price=70_000, original_price=100_000),
        product("p-full", price=100_000),
        *messages,
    ]
    assert triggers(items, view(recent_items=["p-small", "p-big", "p-full"]))["price_drop"] == "p-big"
    assert "price_drop" not in triggers(items, view(recent_items=["p-small", "p-full"]))
    bought = view(recent_items=["p-big"], purchased_items=["p-big"])
    assert "price_drop" not in triggers(items, bought)


def test_back_in_stock_after_the_watch_saw_it_sold_out(messages: list[CatalogItem]) -> None:
    watch = StockWatch(None)
    visitor = view(recent_items=["p-restock"])
    assert "back_in_stock" not in triggers([product("p-restock", stock=0), *messages], visitor, watch=watch)
    assert triggers([product("p-restock", stock=12), *messages], visitor, watch=watch)["back_in_stock"] == "p-restock"
    never_sold_out = StockWatch(None)
    assert "back_in_stock" not in triggers([product("p-restock", stock=12), *messages], visitor, watch=never_sold_out)


def test_new_arrivals_in_a_favourite_category(messages: list[CatalogItem]) -> None:
    new = product("p-new", category="fashion-pria", created_at=(NOW - timedelta(days=2)).isoformat())
    other = product("p-other", category="elektronik", created_at=(NOW - timedelta(days=1)).isoformat())
    old = product("p-old", category="fashion-pria", created_at=(NOW - timedelta(days=40)).isoformat())
    assert triggers([new, other, old, *messages], view())["new_arrivals"] == "p-new"
    assert "new_arrivals" not in triggers([other, old, *messages], view())
    assert "new_arrivals" not in triggers([new, *messages], view(recent_items=["p-new"]))  # already seen


def test_win_back_for_dormant_visitors_and_loyalty_for_loyal_ones(messages: list[CatalogItem]) -> None:
    items = [product("p-deal", price=50_000, original_price=100_000), *messages]
    dormant = view(last_seen_ts=NOW.timestamp() - 45 * 86_400)
    found = triggers(items, dormant, channel="whatsapp")
    assert found["win_back"] == "p-deal"  # the WhatsApp template names a product: a discounted favourite
    assert "win_back" not in triggers(items, view(), channel="email")
    loyal = view(rfm_frequency=5)
    assert "loyalty_reward" in triggers(items, loyal, channel="email")
    assert "loyalty_reward" not in triggers(items, view(rfm_frequency=1), channel="email")
    assert "loyalty_reward" not in triggers(items, view(rfm_frequency=5, last_seen_ts=dormant.last_seen), "email")


def test_payday_promotion_only_in_the_payday_window(messages: list[CatalogItem]) -> None:
    items = [product("p-deal", price=50_000, original_price=100_000), *messages]
    payday = at(2026, 11, 26, 3)
    assert triggers(items, view(last_seen_ts=payday.timestamp() - 3600), now=payday)["payday_promo"] == "p-deal"
    assert "payday_promo" not in triggers(items, view())


# -- tone and rendering --------------------------------------------------------------------------------------


def test_tone_from_persona_traits_and_from_behaviour() -> None:
    researcher = {
        "persona_id": 2,
        "name_en": "Careful Researcher",
        "top_traits": [{"trait": "session_depth", "value": 20.0, "population_mean": 6.0, "ratio": 3.3}],
    }
    hunter = {
        "persona_id": 3,
        "name_en": "Deal Hunter",
        "top_traits": [{"trait": "discount_affinity", "value": 0.8, "population_mean": 0.2, "ratio": 4.0}],
    }
    unnamed = {
        "persona_id": 4,
        "name_en": "Everyday Visitor",
        "top_traits": [{"trait": "purchase_rate", "value": 0.01, "population_mean": 0.05, "ratio": 5.0}],
    }
    visitor = view(session_depth=2, views_30d=10, rfm_frequency=3)
    assert tone_for(visitor, researcher)[0] == "detailed"
    assert tone_for(visitor, hunter)[0] == "short"
    assert tone_for(visitor, unnamed)[0] == "detailed"  # buys rarely per view: reassure
    assert tone_for(visitor, None) == ("short", "decides quickly")
    careful = view(session_depth=20, views_30d=120, rfm_frequency=0)
    assert tone_for(careful, None)[0] == "detailed"


def test_render_picks_locale_and_tone_and_fills_tokens(messages: list[CatalogItem]) -> None:
    snapshot = snapshot_of(messages)
    cart = next(t for t in MessageCatalog.build(snapshot, 0.1).templates if t.item_id == "m001")
    tokens = {"first_name": "Putri", "product": "Sepatu Lari", "price": format_price(149_000, "id")}
    title, body, locale, tone = render(cart, "id", "short", tokens, "push")
    assert (title, body, locale, tone) == (
        "Sepatu Lari masih di keranjang",
        "Checkout sekarang sebelum kehabisan, Putri!",
        "id",
        "short",
    )
    title, body, locale, tone = render(cart, "en", "detailed", {**tokens, "price": format_price(149_000, "en")}, "push")
    assert title == "Putri, your cart is waiting" and "Sepatu Lari at Rp149,000" in body and tone == "detailed"
    assert render(cart, "jv", "chatty", tokens, "push")[2:] == ("id", "short")  # unknown locale/tone: Indonesian, short
    assert fill("{first_name}, {unknown}!", {"first_name": "Budi"}) == "Budi, !"
    assert format_price(1_299_000, "id") == "Rp1.299.000"


HOSTILE_NAME = "Putri\r\nBcc: all@example.com\u202e <a href='https://evil.example'>klik</a>"


def test_tokens_are_escaped_per_channel(messages: list[CatalogItem]) -> None:
    """A visitor-supplied first name (or any token value) cannot add lines, controls or markup to a message."""
    snapshot = snapshot_of(messages)
    cart = next(t for t in MessageCatalog.build(snapshot, 0.1).templates if t.item_id == "m001")
    tokens = {"first_name": HOSTILE_NAME, "product": "Kaos <b>Polo</b>\tPria\x00", "price": "Rp1"}
    for channel in ("push", "whatsapp"):
        title, body, _, _ = render(cart, "id", "short", tokens, channel)
        for text in (title, body):
            assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in text), repr(text)
        assert title == "Kaos <b>Polo</b> Pria masih di keranjang"  # plain text: markup is shown, not run
        assert "Putri Bcc: all@example.com <a href='https://evil.example'>klik</a>!" in body
    title, body, _, _ = render(cart, "id", "short", tokens, "email")
    assert title == "Kaos &lt;b&gt;Polo&lt;/b&gt; Pria masih di keranjang"
    assert "<" not in body and "&lt;a href=&#x27;https://evil.example&#x27;&gt;klik&lt;/a&gt;" in body
    assert "\n" not in body and "\r" not in body


def test_first_name_token_is_the_first_plain_word(messages: list[CatalogItem]) -> None:
    snapshot = snapshot_of(messages)
    cart = next(t for t in MessageCatalog.build(snapshot, 0.1).templates if t.item_id == "m001")
    chosen = Candidate(cart, -1, "test")

    def first_name(name: Any) -> str:
        return tokens_for(view(), chosen, {"first_name": name}, snapshot, "id", 0.1)["first_name"]

    assert first_name(HOSTILE_NAME) == "Putri"
    assert first_name("\r\n  budi\tsantoso") == "Budi"
    assert first_name("\x1b[31m") == "[31M"  # the escape character itself is gone
    assert first_name("\r\n\t ") == "Kak" and first_name(None) == "Kak"  # nothing left: the greeting
    assert len(first_name("a" * 500)) == 40


def test_deep_link_tokens_are_url_encoded(messages: list[CatalogItem]) -> None:
    snapshot = snapshot_of(messages)
    cart = next(t for t in MessageCatalog.build(snapshot, 0.1).templates if t.item_id == "m001")
    template = dataclasses.replace(cart, deep_link="selaras://category/{category}?item={item_id}&ref=msg")
    link = deep_link(template, {"category": "fashion/pria?x=1#top", "item_id": "p 1&ref=evil\r\n"})
    assert link == "selaras://category/fashion%2Fpria%3Fx%3D1%23top?item=p%201%26ref%3Devil&ref=msg"
    assert deep_link(template, {"category": "sepatu", "item_id": "p-cart"}) == (
        "selaras://category/sepatu?item=p-cart&ref=msg"
    )
