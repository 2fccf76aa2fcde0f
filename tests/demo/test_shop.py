"""The demo catalog: size, realism, contracts, message templates and determinism."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from datetime import datetime, timedelta

import pytest

from services.common.catalog import MESSAGE_TRIGGERS, CatalogItem, ItemKind
from services.common.context import CITY_ZONES, WIB
from services.demo.catalogue import CATEGORIES
from services.demo.shop import DemoShop, generate_shop, shop_price

NOW = datetime(2025, 3, 31, tzinfo=WIB)
TRIGGERS = set(MESSAGE_TRIGGERS)
TOKENS = {
    "first_name": "Putri",
    "product": "Wardah Lipstik Matte - 02 Rosy",
    "category": "Kecantikan",
    "discount": "20%",
    "price": "Rp59.000",
    "item_id": "p00042",
}


@pytest.fixture(scope="module")
def shop() -> DemoShop:
    return generate_shop(seed=7, n_products=2000, now=NOW)


def test_sizes_and_ids(shop: DemoShop) -> None:
    assert len(shop.products) == 2000
    assert 9 <= len(shop.banners) <= 12
    assert 7 <= len(shop.ctas) <= 10
    assert len(shop.messages) == 12
    assert len(shop.all_items()) == 2000 + len(shop.banners) + len(shop.ctas) + len(shop.messages)
    assert [item.item_id for item in shop.products[:2]] == ["p00001", "p00002"]
    groups = [
        (shop.products, r"p\d{5}", ItemKind.PRODUCT),
        (shop.banners, r"b\d{3}", ItemKind.BANNER),
        (shop.ctas, r"c\d{3}", ItemKind.CTA),
        (shop.messages, r"m\d{3}", ItemKind.MESSAGE),
    ]
    for items, pattern, kind in groups:
        assert all(re.fullmatch(pattern, item.item_id) and item.kind is kind for item in items)
    ids = [item.item_id for item in shop.all_items()]
    assert len(ids) == len(set(ids))


def test_every_item_validates_against_the_contract(shop: DemoShop) -> None:
    for item in shop.all_items():
        dumped = item.model_dump(mode="json", exclude_none=True)
        assert CatalogItem.model_validate(dumped) == item


def test_categories_brands_and_titles(shop: DemoShop) -> None:
    per_category = Counter(item.category for item in shop.products)
    assert set(per_category) == {spec.slug for spec in CATEGORIES}
    assert len(per_category) == 20
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", slug or "") for slug in per_category)
    assert min(per_category.values()) >= 40
    brands = {item.brand for item in shop.products}
    assert {"Wardah", "Erigo", "Indomie", "Samsung", "Xiaomi", "Eiger"} <= brands
    titles = [item.title for item in shop.products]
    assert len(set(titles)) == len(titles)
    # Titles name the brand (books name the publisher in brackets).
    assert all(item.brand and item.brand in item.title for item in shop.products)


def test_prices_are_realistic_and_rounded(shop: DemoShop) -> None:
    def median(category: str) -> float:
        return statistics.median(item.price or 0 for item in shop.products if item.category == category)

    for item in shop.products:
        price = item.price or 0
        assert 500 <= price <= 100_000_000
        assert price % 500 == 0
        if price >= 20_000:
            assert price % 1000 == 0
    assert 5_000_000 < median("laptop") < 25_000_000
    assert median("laptop") > median("handphone") > median("elektronik") > median("fashion-pria")
    assert median("fashion-wanita") > median("kecantikan") > median("makanan-ringan")
    assert median("kebutuhan-dapur") < 100_000
    assert shop_price(143_200) == 149_000
    assert shop_price(1_234_567) == 1_249_000
    assert shop_price(12_300) == 12_500


def test_discounts_stock_and_ages(shop: DemoShop) -> None:
    discounted = [item for item in shop.products if item.original_price is not None]
    assert 0.25 <= len(discounted) / len(shop.products) <= 0.35
    assert all((item.original_price or 0) > (item.price or 0) for item in discounted)
    assert all(0 < item.discount < 0.7 for item in discounted)
    sold_out = sum(item.stock == 0 for item in shop.products)
    assert 0.02 <= sold_out / len(shop.products) <= 0.15
    assert all(item.stock is not None and item.stock >= 0 for item in shop.products)
    ages = [NOW - item.created_at for item in shop.products if item.created_at is not None]
    assert len(ages) == len(shop.products)
    assert all(timedelta(0) <= age <= timedelta(days=180) for age in ages)
    new = sum(age <= timedelta(days=14) for age in ages)
    assert 0.05 <= new / len(ages) <= 0.25
    assert 1 <= sum(item.pinned for item in shop.products) <= 20
    assert 5 <= sum(item.boost > 1 for item in shop.products) <= 60
    assert all(item.in_stock for item in shop.products if item.pinned or item.boost > 1)


def test_banners_and_ctas_have_targeting(shop: DemoShop) -> None:
    categories = {spec.slug for spec in CATEGORIES}
    for item in [*shop.banners, *shop.ctas]:
        assert item.title and item.targeting.personas == []
        assert set(item.targeting.categories) <= categories
        assert set(item.targeting.cities) <= set(CITY_ZONES)
        assert set(item.targeting.devices) <= {"mobile", "desktop", "tablet", "app"}
    targeted = [item.targeting for item in shop.banners]
    assert any(targeting.payday_only for targeting in targeted)
    assert any(targeting.hours for targeting in targeted)
    assert any(targeting.devices for targeting in targeted)
    assert any(targeting.cities for targeting in targeted)
    assert sum(bool(targeting.categories) for targeting in targeted) >= 5
    cta_titles = {item.title for item in shop.ctas}
    assert {"Gratis Ongkir", "Checkout sekarang", "Lihat ulasan"} <= cta_titles


def test_message_templates_cover_triggers_locales_tones_and_tokens(shop: DemoShop) -> None:
    templates = [item.message for item in shop.messages]
    assert all(template is not None for template in templates)
    triggers = {template.trigger for template in templates if template is not None}
    assert triggers == TRIGGERS
    channels = {channel for template in templates if template is not None for channel in template.channels}
    assert channels == {"push", "email", "whatsapp"}
    used_tokens: set[str] = set()
    for template in templates:
        assert template is not None
        assert template.cooldown_hours >= 12
        assert template.deep_link.startswith("selaras://")
        assert template.deep_link.format_map(TOKENS)
        assert set(template.texts) == {"id", "en"}
        for locale in ("id", "en"):
            assert set(template.texts[locale]) == {"short", "detailed"}
            short, detailed = template.texts[locale]["short"], template.texts[locale]["detailed"]
            assert len(detailed["body"]) > len(short["body"])
            for tone in (short, detailed):
                assert set(tone) == {"title", "body"}
                for text in tone.values():
                    used_tokens |= set(re.findall(r"\{(\w+)\}", text))
                    rendered = text.format_map(TOKENS)
                    assert "{" not in rendered and "}" not in rendered
    assert {"first_name", "product", "category", "discount", "price"} <= used_tokens
    # Indonesian texts are in Indonesian, English ones in English.
    id_bodies = " ".join(t.texts["id"]["detailed"]["body"] for t in templates if t is not None)
    en_bodies = " ".join(t.texts["en"]["detailed"]["body"] for t in templates if t is not None)
    assert "untuk" in id_bodies and "the" in en_bodies


def test_same_seed_same_shop_other_seed_other_shop(shop: DemoShop) -> None:
    again = generate_shop(seed=7, n_products=2000, now=NOW)
    assert [item.model_dump() for item in again.all_items()] == [item.model_dump() for item in shop.all_items()]
    other = generate_shop(seed=8, n_products=2000, now=NOW)
    assert [item.title for item in other.products] != [item.title for item in shop.products]


def test_small_shop_and_default_now() -> None:
    small = generate_shop(seed=1, n_products=100)
    assert len(small.products) == 100
    assert len({item.category for item in small.products}) == 20
    assert small.generated_at.tzinfo is not None
    assert all(item.created_at and item.created_at <= small.generated_at for item in small.products)
    with pytest.raises(ValueError, match="timezone"):
        generate_shop(now=datetime(2025, 3, 31))
