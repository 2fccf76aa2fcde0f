"""A realistic Indonesian online shop: products, banners, calls-to-action and message templates.

Everything is generated from a seed (no downloads), so demos, tests and benchmarks share one catalog.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import numpy as np

from services.common.catalog import CatalogItem, ItemKind, MessageTemplate, Targeting
from services.common.clock import SYSTEM_CLOCK
from services.common.context import CITY_ZONES, WIB, WIT, WITA
from services.demo.catalogue import (
    BRAND_PRICE_TIER,
    CATEGORIES,
    FASHION_BEAUTY,
    GADGETS,
    GROCERIES,
    CategorySpec,
    ProductLine,
)

SHOP_URL: Final = "https://tokodemo.example"
NEW_ARRIVAL_DAYS: Final = 14
CATALOG_AGE_DAYS: Final = 180


EAST_CITIES: Final = tuple(sorted(city for city, zone in CITY_ZONES.items() if zone in (WITA, WIT)))

DISCOUNT_STEPS: Final = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
DISCOUNT_STEP_WEIGHTS: Final = (0.08, 0.2, 0.16, 0.16, 0.12, 0.12, 0.08, 0.05, 0.03)


@dataclass(frozen=True)
class DemoShop:
    """The generated catalog. `generated_at` is the `now` the product ages are relative to."""

    products: list[CatalogItem]
    banners: list[CatalogItem]
    ctas: list[CatalogItem]
    messages: list[CatalogItem]
    generated_at: datetime

    def all_items(self) -> list[CatalogItem]:
        return [*self.products, *self.banners, *self.ctas, *self.messages]

    def by_id(self) -> dict[str, CatalogItem]:
        return {item.item_id: item for item in self.all_items()}


def shop_price(raw: float) -> float:
    """Round like Indonesian shops do: 12.500, 49.000, 149.000, 1.299.000, 24.499.000."""
    if raw < 20_000:
        return float(max(500, round(raw / 500) * 500))
    if raw < 200_000:
        step, cut = 10_000, 1_000
    elif raw < 2_000_000:
        step, cut = 50_000, 1_000
    elif raw < 20_000_000:
        step, cut = 100_000, 1_000
    else:
        step, cut = 500_000, 1_000
    return float(math.ceil(raw / step) * step - cut)


def generate_shop(seed: int = 7, n_products: int = 2000, now: datetime | None = None) -> DemoShop:
    """The demo catalog. `now` defaults to today's midnight in WIB, so ages are stable within a day."""
    if now is None:
        now = SYSTEM_CLOCK.now_datetime().astimezone(WIB).replace(hour=0, minute=0, second=0, microsecond=0)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    rng = np.random.default_rng(seed)
    products = _products(rng, n_products, now)
    return DemoShop(
        products=products,
        banners=_banners(now),
        ctas=_ctas(now),
        messages=_messages(now),
        generated_at=now,
    )


def _category_counts(n_products: int) -> list[int]:
    """Products per category in proportion to the weights, summing exactly to n_products."""
    weights = np.array([spec.weight for spec in CATEGORIES])
    exact = weights / weights.sum() * n_products
    counts = np.floor(exact).astype(int)
    # Largest remainders get the leftover products so the total is exact.
    for index in np.argsort(-(exact - counts))[: n_products - int(counts.sum())]:
        counts[index] += 1
    return [int(count) for count in counts]


def _combinations(spec: CategorySpec) -> list[tuple[ProductLine, str, str, str, float]]:
    """Every distinct product the category could hold: (line, brand, variant, extra, extra price factor)."""
    return [
        (line, brand, variant, extra, factor)
        for line in spec.lines
        for brand in line.brands
        for variant in line.variants
        for extra, factor in spec.extras
    ]


def _products(rng: np.random.Generator, n_products: int, now: datetime) -> list[CatalogItem]:
    products: list[CatalogItem] = []
    for spec, count in zip(CATEGORIES, _category_counts(n_products), strict=True):
        combos = _combinations(spec)
        # Brand popularity is skewed (a few brands dominate each category, as on real marketplaces), and
        # plain variants are more common than multipacks or bundles.
        brand_share = dict(zip(spec.brands, rng.dirichlet(np.full(len(spec.brands), 2.0)), strict=True))
        weights = np.array([brand_share[brand] * (0.6 if extra else 1.0) for _, brand, _, extra, _ in combos])
        # Without replacement, so titles are unique while the category has enough combinations.
        picks = rng.choice(len(combos), size=count, replace=count > len(combos), p=weights / weights.sum())
        for pick in picks:
            line, brand, variant, extra, factor = combos[int(pick)]
            title = spec.title_format.format(
                brand=brand, noun=line.noun, variant=variant, extra=f" {extra}" if extra else ""
            )
            median = line.median_price * factor * BRAND_PRICE_TIER.get(brand, 1.0)
            products.append(_product(rng, len(products) + 1, spec, brand, title, median, line.sigma, now))
    # Merchandiser controls: a handful pinned, a few dozen boosted (in-stock items only).
    in_stock = [index for index, item in enumerate(products) if item.in_stock]
    chosen = rng.choice(len(in_stock), size=min(len(in_stock), 40), replace=False)
    for rank, pick in enumerate(chosen):
        item = products[in_stock[int(pick)]]
        if rank < 8:
            item.pinned = True
        else:
            item.boost = round(float(rng.uniform(1.2, 2.0)), 2)
    return products


def _product(
    rng: np.random.Generator,
    number: int,
    spec: CategorySpec,
    brand: str,
    title: str,
    median_price: float,
    sigma: float,
    now: datetime,
) -> CatalogItem:
    item_id = f"p{number:05d}"
    price = shop_price(float(rng.lognormal(math.log(median_price), sigma)))
    original_price: float | None = None
    if rng.random() < 0.3:
        off = float(rng.choice(DISCOUNT_STEPS, p=DISCOUNT_STEP_WEIGHTS))
        original_price = shop_price(price / (1.0 - off))
        if original_price <= price:
            original_price = shop_price(price * 1.1 + 1_000)
    # Expensive items are kept in smaller quantities; ~7% are sold out.
    stock = 0
    if rng.random() >= 0.07:
        stock = int(1 + rng.lognormal(math.log(60), 1.0) * (2e5 / (price + 2e5)))
    # Mostly uniform over the catalog's lifetime, plus an extra batch of new arrivals.
    if rng.random() < 0.08:
        age_days = float(rng.uniform(0, NEW_ARRIVAL_DAYS))
    else:
        age_days = float(rng.uniform(0, CATALOG_AGE_DAYS))
    tags: list[str] = []
    if original_price is not None:
        tags.append("diskon")
    if age_days <= NEW_ARRIVAL_DAYS:
        tags.append("baru")
    if rng.random() < 0.25:
        tags.append("gratis-ongkir")
    if rng.random() < 0.1:
        tags.append("terlaris")
    return CatalogItem(
        item_id=item_id,
        kind=ItemKind.PRODUCT,
        title=title,
        category=spec.slug,
        brand=brand,
        price=price,
        original_price=original_price,
        stock=stock,
        created_at=now - timedelta(days=age_days),
        tags=tags,
        image_url=f"{SHOP_URL}/img/{item_id}.jpg",
        url=f"{SHOP_URL}/produk/{item_id}",
    )


def _banners(now: datetime) -> list[CatalogItem]:
    lunch = [11, 12, 13]
    night = [21, 22, 23, 0, 1, 2]
    morning = [5, 6, 7, 8, 9]
    specs: list[tuple[str, Targeting, list[str]]] = [
        ("Payday Sale: Diskon hingga 50%", Targeting(payday_only=True), ["payday", "promo"]),
        (
            "Flash Sale Gadget Tengah Malam",
            Targeting(categories=["handphone", "aksesoris-gadget", "laptop"], hours=night),
            ["gadget", "flash-sale"],
        ),
        (
            "Koleksi Fashion Terbaru Minggu Ini",
            Targeting(categories=["fashion-wanita", "fashion-pria", "sepatu-olahraga"]),
            ["fashion", "baru"],
        ),
        (
            "Glowing Bareng Brand Lokal Favoritmu",
            Targeting(categories=["kecantikan", "perawatan-kulit"]),
            ["beauty", "lokal"],
        ),
        (
            "Belanja Bulanan Lebih Hemat",
            Targeting(categories=["kebutuhan-dapur", "minuman", "makanan-ringan"]),
            ["hemat", "promo"],
        ),
        ("Gratis Ongkir ke Indonesia Timur", Targeting(cities=list(EAST_CITIES)), ["gratis-ongkir"]),
        ("Promo Makan Siang: Cashback 20%", Targeting(hours=lunch, devices=["mobile", "app"]), ["cashback"]),
        ("Perlengkapan Si Kecil Serba Hemat", Targeting(categories=["ibu-bayi", "mainan"]), ["keluarga"]),
        (
            "Semangat Olahraga Pagi",
            Targeting(categories=["olahraga", "sepatu-olahraga"], hours=morning),
            ["olahraga"],
        ),
        ("Diskon Ekstra 10% Khusus Aplikasi", Targeting(devices=["app"]), ["app", "promo"]),
        (
            "Upgrade Laptop untuk Kerja & Kuliah",
            Targeting(categories=["laptop", "elektronik"], devices=["desktop"]),
            ["gadget"],
        ),
    ]
    return [
        CatalogItem(
            item_id=f"b{index:03d}",
            kind=ItemKind.BANNER,
            title=title,
            category=targeting.categories[0] if targeting.categories else None,
            created_at=now - timedelta(days=30 - index),
            tags=tags,
            image_url=f"{SHOP_URL}/img/banner-{index:03d}.jpg",
            url=f"{SHOP_URL}/promo/b{index:03d}",
            targeting=targeting,
        )
        for index, (title, targeting, tags) in enumerate(specs, start=1)
    ]


def _ctas(now: datetime) -> list[CatalogItem]:
    specs: list[tuple[str, Targeting, list[str]]] = [
        ("Gratis Ongkir", Targeting(), ["gratis-ongkir"]),
        ("Checkout sekarang", Targeting(devices=["mobile", "app"]), ["checkout"]),
        ("Lihat ulasan", Targeting(), ["ulasan"]),
        ("Bayar nanti pakai PayLater", Targeting(categories=sorted(GADGETS)), ["paylater"]),
        ("Pakai voucher payday", Targeting(payday_only=True), ["payday"]),
        ("Bandingkan produk", Targeting(devices=["desktop", "tablet"]), ["bandingkan"]),
        ("Beli lagi", Targeting(categories=sorted(GROCERIES | FASHION_BEAUTY)), ["beli-lagi"]),
        ("Kabari saya kalau harga turun", Targeting(), ["harga-turun"]),
    ]
    return [
        CatalogItem(
            item_id=f"c{index:03d}",
            kind=ItemKind.CTA,
            title=title,
            created_at=now - timedelta(days=60),
            tags=tags,
            targeting=targeting,
        )
        for index, (title, targeting, tags) in enumerate(specs, start=1)
    ]


def _texts(
    id_short: tuple[str, str],
    id_detailed: tuple[str, str],
    en_short: tuple[str, str],
    en_detailed: tuple[str, str],
) -> dict[str, dict[str, dict[str, str]]]:
    def pair(title_body: tuple[str, str]) -> dict[str, str]:
        return {"title": title_body[0], "body": title_body[1]}

    return {
        "id": {"short": pair(id_short), "detailed": pair(id_detailed)},
        "en": {"short": pair(en_short), "detailed": pair(en_detailed)},
    }


def _messages(now: datetime) -> list[CatalogItem]:
    product_link = "selaras://product/{item_id}"
    # (title, trigger, channels, cooldown hours, deep link, texts)
    specs: list[tuple[str, str, list[str], float, str, dict[str, dict[str, dict[str, str]]]]] = [
        (
            "Pengingat keranjang (push)",
            "cart_abandonment",
            ["push"],
            24,
            product_link,
            _texts(
                ("{product} masih di keranjang", "Checkout sekarang sebelum kehabisan, {first_name}!"),
                (
                    "{first_name}, keranjangmu masih menunggu",
                    "{product} seharga {price} sudah kami simpan untukmu. Pembayaran aman, bisa COD, "
                    "dan kalau tidak cocok bisa dikembalikan dalam 7 hari.",
                ),
                ("{product} is still in your cart", "Check out now before it sells out, {first_name}!"),
                (
                    "{first_name}, your cart is waiting",
                    "We saved {product} at {price} for you. Payment is secure, cash on delivery is "
                    "available and returns are free within 7 days.",
                ),
            ),
        ),
        (
            "Pengingat keranjang (WhatsApp/email)",
            "cart_abandonment",
            ["whatsapp", "email"],
            48,
            product_link,
            _texts(
                ("Lanjutkan belanjamu", "Hai {first_name}, {product} tinggal selangkah lagi."),
                (
                    "Hai {first_name}, ada yang tertinggal",
                    "Kamu belum menyelesaikan pesanan {product} ({price}). Stoknya terbatas, jadi kami "
                    "ingatkan ya. Butuh bantuan? Balas pesan ini dan tim kami siap membantu.",
                ),
                ("Finish your order", "Hi {first_name}, {product} is one step away."),
                (
                    "Hi {first_name}, you left something behind",
                    "You haven't finished ordering {product} ({price}). Stock is limited, so here is a "
                    "friendly reminder. Need help? Reply to this message and our team will assist you.",
                ),
            ),
        ),
        (
            "Harga turun (push)",
            "price_drop",
            ["push"],
            72,
            product_link,
            _texts(
                ("Harga turun {discount}!", "{product} sekarang cuma {price}."),
                (
                    "Kabar baik, {first_name}: harga {product} turun",
                    "Produk yang kamu lihat kini lebih murah {discount}, jadi {price}. Harga promo berlaku "
                    "selama persediaan ada, dan tetap bergaransi resmi.",
                ),
                ("Price dropped {discount}!", "{product} is now only {price}."),
                (
                    "Good news, {first_name}: {product} got cheaper",
                    "The item you viewed is now {discount} off at {price}. The promo price lasts while "
                    "stock lasts, with the official warranty included.",
                ),
            ),
        ),
        (
            "Harga turun (email/WhatsApp)",
            "price_drop",
            ["email", "whatsapp"],
            96,
            product_link,
            _texts(
                ("Diskon {discount} untuk {product}", "Cek sekarang, {first_name}!"),
                (
                    "{first_name}, incaranmu lagi diskon",
                    "{product} di kategori {category} sekarang {price} (hemat {discount}). Kami kabari "
                    "karena kamu sempat melihatnya; gratis ongkir untuk pesanan hari ini.",
                ),
                ("{discount} off {product}", "Take a look, {first_name}!"),
                (
                    "{first_name}, an item you liked is on sale",
                    "{product} in {category} is now {price} ({discount} off). We're letting you know "
                    "because you viewed it; shipping is free for orders placed today.",
                ),
            ),
        ),
        (
            "Stok kembali",
            "back_in_stock",
            ["push", "email"],
            72,
            product_link,
            _texts(
                ("{product} tersedia lagi", "Stok terbatas, amankan sekarang."),
                (
                    "{first_name}, {product} sudah tersedia kembali",
                    "Produk yang kamu tunggu sudah restock dengan harga {price}. Stok terbatas, jadi kami "
                    "kabari lebih dulu. Pengiriman dari gudang terdekat.",
                ),
                ("{product} is back", "Limited stock, grab it now."),
                (
                    "{first_name}, {product} is back in stock",
                    "The item you were waiting for is back at {price}. Stock is limited, so you're the first "
                    "to know. It ships from the nearest warehouse.",
                ),
            ),
        ),
        (
            "Produk baru (email)",
            "new_arrivals",
            ["email"],
            168,
            "selaras://new-arrivals",
            _texts(
                ("Baru di {category}", "Koleksi terbaru sudah datang, {first_name}."),
                (
                    "{first_name}, koleksi {category} terbaru untukmu",
                    "Kami memilih produk baru yang cocok dengan seleramu, termasuk {product}. Semua "
                    "original, bisa COD, dan gratis retur 7 hari.",
                ),
                ("New in {category}", "Fresh arrivals are here, {first_name}."),
                (
                    "{first_name}, new {category} picks for you",
                    "We picked new arrivals that match your taste, including {product}. Everything is "
                    "authentic, cash on delivery is available and returns are free for 7 days.",
                ),
            ),
        ),
        (
            "Produk baru (push)",
            "new_arrivals",
            ["push"],
            120,
            product_link,
            _texts(
                ("Baru: {product}", "Jadi yang pertama punya."),
                (
                    "{first_name}, ada yang baru di {category}",
                    "{product} baru saja masuk dengan harga {price}. Kami kabari karena kamu sering "
                    "melihat {category}.",
                ),
                ("New: {product}", "Be the first to get it."),
                (
                    "{first_name}, something new in {category}",
                    "{product} just arrived at {price}. We're telling you because you often browse {category}.",
                ),
            ),
        ),
        (
            "Kangen kamu (email)",
            "win_back",
            ["email"],
            336,
            "selaras://home",
            _texts(
                ("Kami kangen, {first_name}", "Ada diskon {discount} buat kamu."),
                (
                    "{first_name}, sudah lama tidak mampir",
                    "Sebagai sambutan kembali, nikmati diskon {discount} untuk belanja berikutnya, termasuk "
                    "{category}. Voucher berlaku 7 hari dan bisa dipakai bersama gratis ongkir.",
                ),
                ("We miss you, {first_name}", "Here's {discount} off for you."),
                (
                    "{first_name}, it's been a while",
                    "Welcome back: enjoy {discount} off your next order, including {category}. The voucher "
                    "is valid for 7 days and works together with free shipping.",
                ),
            ),
        ),
        (
            "Kangen kamu (WhatsApp)",
            "win_back",
            ["whatsapp"],
            336,
            product_link,
            _texts(
                ("Hai {first_name}, ada yang baru", "{product} lagi diskon {discount}."),
                (
                    "Hai {first_name}, apa kabar?",
                    "Sudah lama kamu tidak berbelanja. {product} yang mungkin kamu suka sedang diskon "
                    "{discount}, jadi {price}. Balas STOP kalau tidak ingin menerima pesan lagi.",
                ),
                ("Hi {first_name}, something new", "{product} is {discount} off."),
                (
                    "Hi {first_name}, how have you been?",
                    "It's been a while since your last order. {product}, which you may like, is "
                    "{discount} off at {price}. Reply STOP to unsubscribe.",
                ),
            ),
        ),
        (
            "Hadiah pelanggan setia",
            "loyalty_reward",
            ["email", "push"],
            336,
            "selaras://rewards",
            _texts(
                ("Hadiah untukmu, {first_name}", "Voucher {discount} sudah masuk akunmu."),
                (
                    "Terima kasih sudah setia, {first_name}",
                    "Sebagai pelanggan setia, kamu dapat voucher {discount} untuk {category}. Voucher "
                    "sudah otomatis ada di akunmu dan berlaku 14 hari.",
                ),
                ("A gift for you, {first_name}", "A {discount} voucher is in your account."),
                (
                    "Thank you for being loyal, {first_name}",
                    "As a loyal customer you get a {discount} voucher for {category}. It's already in "
                    "your account and valid for 14 days.",
                ),
            ),
        ),
        (
            "Promo gajian (push/WhatsApp)",
            "payday_promo",
            ["push", "whatsapp"],
            120,
            "selaras://promo/payday",
            _texts(
                ("Gajian! Diskon {discount}", "{product} cuma {price} hari ini."),
                (
                    "{first_name}, saatnya belanja gajian",
                    "Promo gajian sudah mulai: {product} sekarang {price} (hemat {discount}). Bisa cicilan "
                    "0% dan gratis ongkir sampai akhir promo.",
                ),
                ("Payday! {discount} off", "{product} is just {price} today."),
                (
                    "{first_name}, it's payday shopping time",
                    "The payday sale is on: {product} is now {price} ({discount} off). 0% instalments "
                    "and free shipping until the promo ends.",
                ),
            ),
        ),
        (
            "Promo gajian (email)",
            "payday_promo",
            ["email"],
            168,
            "selaras://promo/payday",
            _texts(
                ("Promo gajian {category}", "Diskon sampai {discount}, {first_name}."),
                (
                    "{first_name}, promo gajian pilihan untukmu",
                    "Kami kumpulkan penawaran terbaik di {category}, termasuk {product} seharga {price}. "
                    "Diskon sampai {discount}, pembayaran aman, dan bisa dikembalikan dalam 7 hari.",
                ),
                ("Payday deals in {category}", "Up to {discount} off, {first_name}."),
                (
                    "{first_name}, payday deals picked for you",
                    "We gathered the best {category} offers, including {product} at {price}. Up to "
                    "{discount} off, secure payment and 7-day returns.",
                ),
            ),
        ),
    ]
    return [
        CatalogItem(
            item_id=f"m{index:03d}",
            kind=ItemKind.MESSAGE,
            title=title,
            created_at=now - timedelta(days=90),
            tags=[trigger.replace("_", "-")],
            message=MessageTemplate(
                channels=channels, trigger=trigger, texts=texts, deep_link=deep_link, cooldown_hours=cooldown
            ),
        )
        for index, (title, trigger, channels, cooldown, deep_link, texts) in enumerate(specs, start=1)
    ]
