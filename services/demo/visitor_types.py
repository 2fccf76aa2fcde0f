"""The simulator's hidden visitor types: what each type likes, when it shops, how it reacts to prices,
discounts and messages, and the cities and names visitors are drawn from. Pure data and one dataclass; the
visitor model (visitor_model.py) samples each visitor around its type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timezone
from typing import Final

import numpy as np

from services.common.context import CITY_ZONES, WIB

VISITOR_TYPES: Final = (
    "deal_hunter",
    "busy_professional",
    "careful_first_timer",
    "loyal_fashionista",
    "gadget_enthusiast",
)


@dataclass(frozen=True)
class TypeProfile:
    """The behaviour of one hidden visitor type; each visitor is sampled with noise around it."""

    share: float
    category_weights: Mapping[str, float]  # unlisted categories get `other_weight`
    other_weight: float
    category_concentration: float  # Dirichlet concentration: low means each visitor focuses on a few
    brand_loyalty: float  # utility bonus for the visitor's favourite brands
    price_level: float  # log multiple of the category's median price the visitor aims at
    price_sensitivity: float  # 0..1: how sharply prices away from the target put them off
    discount_sensitivity: float  # 0..1
    hour_peaks: tuple[tuple[float, float, float], ...]  # (local hour, width in hours, weight)
    devices: Mapping[str, float]
    visits_per_week: float
    weekend_factor: float
    payday_visit_factor: float
    session_views: float  # mean product views per session
    view_gap_seconds: float  # median time between two events in a session
    session_categories: int  # categories one session focuses on
    revisit_rate: float  # re-viewing an item already seen in the session (comparing)
    search_rate: float
    cart_rate: float  # per product view, for an item of average appeal
    checkout_rate: float  # per session that ends with a non-empty cart
    payday_checkout_factor: float
    off_payday_checkout_factor: float
    remove_rate: float
    churn_rate: float  # share that stops visiting during the window (becomes dormant)
    new_share: float  # share whose first visit falls inside the window rather than on day 0
    en_share: float
    referrers: Mapping[str, float]
    search_words: tuple[str, ...]
    daily_purchase_rate: float  # organic purchases per day, for `organic_purchase_probability`
    trigger_affinity: Mapping[str, float]
    channel_affinity: Mapping[str, float]
    message_conversion: float  # purchase probability after a message click
    tag_affinity: Mapping[str, float]  # banner/CTA tags the type likes


TYPE_PROFILES: Final[dict[str, TypeProfile]] = {
    "deal_hunter": TypeProfile(
        share=0.24,
        category_weights={
            "makanan-ringan": 3.0, "kebutuhan-dapur": 3.0, "minuman": 2.0, "kecantikan": 2.0,
            "perawatan-kulit": 1.5, "rumah-tangga": 2.0, "fashion-wanita": 1.5, "fashion-pria": 1.0,
            "ibu-bayi": 1.5, "kesehatan": 1.0,
        },
        other_weight=0.3,
        category_concentration=12.0,
        brand_loyalty=0.2,
        price_level=-0.7,
        price_sensitivity=0.9,
        discount_sensitivity=0.95,
        hour_peaks=((20.5, 1.3, 1.0), (12.5, 0.8, 0.3)),
        devices={"mobile": 0.8, "app": 0.15, "desktop": 0.05},
        visits_per_week=4.0,
        weekend_factor=1.2,
        payday_visit_factor=1.7,
        session_views=8.0,
        view_gap_seconds=25.0,
        session_categories=3,
        revisit_rate=0.05,
        search_rate=0.5,
        cart_rate=0.065,
        checkout_rate=0.35,
        payday_checkout_factor=2.6,
        off_payday_checkout_factor=0.35,
        remove_rate=0.15,
        churn_rate=0.1,
        new_share=0.2,
        en_share=0.05,
        referrers={"": 0.3, "tiktok": 0.3, "instagram": 0.2, "facebook": 0.1, "whatsapp": 0.1},
        search_words=("murah", "promo", "diskon", "grosir", "paket hemat"),
        daily_purchase_rate=0.05,
        trigger_affinity={
            "cart_abandonment": 1.0, "price_drop": 2.2, "back_in_stock": 1.0, "new_arrivals": 0.6,
            "win_back": 1.2, "loyalty_reward": 0.8, "payday_promo": 2.0,
        },
        channel_affinity={"push": 1.1, "email": 0.7, "whatsapp": 1.3},
        message_conversion=0.25,
        tag_affinity={
            "payday": 1.0, "promo": 0.8, "flash-sale": 0.8, "hemat": 1.0, "cashback": 1.0,
            "gratis-ongkir": 1.2, "harga-turun": 1.0,
        },
    ),
    "busy_professional": TypeProfile(
        share=0.2,
        category_weights={
            "kebutuhan-dapur": 2.0, "minuman": 2.5, "kesehatan": 2.0, "perawatan-kulit": 1.5,
            "fashion-pria": 1.5, "aksesoris-gadget": 1.5, "buku": 1.0, "rumah-tangga": 1.0,
        },
        other_weight=0.3,
        category_concentration=12.0,
        brand_loyalty=1.2,
        price_level=0.3,
        price_sensitivity=0.2,
        discount_sensitivity=0.1,
        hour_peaks=((12.3, 0.7, 1.0), (7.3, 0.7, 0.7)),
        devices={"app": 0.75, "mobile": 0.2, "desktop": 0.05},
        visits_per_week=2.5,
        weekend_factor=0.6,
        payday_visit_factor=1.1,
        session_views=2.0,
        view_gap_seconds=12.0,
        session_categories=1,
        revisit_rate=0.0,
        search_rate=0.75,
        cart_rate=0.45,
        checkout_rate=0.85,
        payday_checkout_factor=1.1,
        off_payday_checkout_factor=1.0,
        remove_rate=0.02,
        churn_rate=0.12,
        new_share=0.2,
        en_share=0.2,
        referrers={"": 0.8, "google": 0.15, "email": 0.05},
        search_words=("original", "", "", "terbaik"),
        daily_purchase_rate=0.09,
        trigger_affinity={
            "cart_abandonment": 2.2, "price_drop": 0.7, "back_in_stock": 1.3, "new_arrivals": 0.5,
            "win_back": 0.6, "loyalty_reward": 0.9, "payday_promo": 0.7,
        },
        channel_affinity={"push": 1.0, "email": 0.6, "whatsapp": 1.4},
        message_conversion=0.35,
        tag_affinity={"checkout": 1.5, "beli-lagi": 1.2, "cashback": 0.5, "app": 0.5, "gratis-ongkir": 0.3},
    ),
    "careful_first_timer": TypeProfile(
        share=0.2,
        category_weights={
            "elektronik": 2.0, "handphone": 1.5, "laptop": 1.5, "ibu-bayi": 2.0, "rumah-tangga": 1.5,
            "dekorasi-rumah": 1.5, "sepatu-olahraga": 1.5, "olahraga": 1.5, "otomotif": 1.0,
        },
        other_weight=0.5,
        category_concentration=2.0,
        brand_loyalty=0.3,
        price_level=0.0,
        price_sensitivity=0.6,
        discount_sensitivity=0.45,
        hour_peaks=((15.0, 2.0, 1.0), (19.5, 1.5, 0.7)),
        devices={"desktop": 0.7, "tablet": 0.1, "mobile": 0.2},
        visits_per_week=2.0,
        weekend_factor=1.3,
        payday_visit_factor=1.1,
        session_views=20.0,
        view_gap_seconds=75.0,
        session_categories=1,
        revisit_rate=0.35,
        search_rate=0.6,
        cart_rate=0.04,
        checkout_rate=0.08,
        payday_checkout_factor=1.2,
        off_payday_checkout_factor=1.0,
        remove_rate=0.5,
        churn_rate=0.35,
        new_share=0.9,
        en_share=0.08,
        referrers={"google": 0.6, "": 0.2, "youtube": 0.2},
        search_words=("review", "terbaik", "bagus", "vs", "garansi resmi", "original"),
        daily_purchase_rate=0.01,
        trigger_affinity={
            "cart_abandonment": 1.0, "price_drop": 1.4, "back_in_stock": 1.4, "new_arrivals": 0.9,
            "win_back": 0.8, "loyalty_reward": 0.6, "payday_promo": 0.8,
        },
        channel_affinity={"push": 0.8, "email": 1.5, "whatsapp": 0.8},
        message_conversion=0.08,
        tag_affinity={"ulasan": 1.5, "bandingkan": 1.5, "gratis-ongkir": 0.8, "harga-turun": 0.6},
    ),
    "loyal_fashionista": TypeProfile(
        share=0.16,
        category_weights={
            "fashion-wanita": 5.0, "fashion-pria": 2.0, "kecantikan": 4.0, "perawatan-kulit": 3.0,
            "sepatu-olahraga": 1.0,
        },
        other_weight=0.15,
        category_concentration=20.0,
        brand_loyalty=3.0,
        price_level=0.2,
        price_sensitivity=0.4,
        discount_sensitivity=0.35,
        hour_peaks=((10.0, 1.3, 0.8), (21.0, 1.3, 1.0)),
        devices={"app": 0.6, "mobile": 0.35, "tablet": 0.05},
        visits_per_week=6.0,
        weekend_factor=1.1,
        payday_visit_factor=1.2,
        session_views=6.0,
        view_gap_seconds=30.0,
        session_categories=2,
        revisit_rate=0.05,
        search_rate=0.3,
        cart_rate=0.1,
        checkout_rate=0.5,
        payday_checkout_factor=1.3,
        off_payday_checkout_factor=1.0,
        remove_rate=0.05,
        churn_rate=0.03,
        new_share=0.1,
        en_share=0.06,
        referrers={"": 0.5, "instagram": 0.35, "tiktok": 0.15},
        search_words=("terbaru", "", "ootd", "kekinian"),
        daily_purchase_rate=0.12,
        trigger_affinity={
            "cart_abandonment": 1.1, "price_drop": 1.0, "back_in_stock": 1.2, "new_arrivals": 2.2,
            "win_back": 0.9, "loyalty_reward": 2.3, "payday_promo": 1.1,
        },
        channel_affinity={"push": 1.3, "email": 1.1, "whatsapp": 1.1},
        message_conversion=0.3,
        tag_affinity={"baru": 1.0, "fashion": 1.2, "beauty": 1.2, "lokal": 0.6, "beli-lagi": 0.8, "app": 0.5},
    ),
    "gadget_enthusiast": TypeProfile(
        share=0.2,
        category_weights={"handphone": 4.0, "aksesoris-gadget": 4.0, "laptop": 3.0, "elektronik": 3.0},
        other_weight=0.15,
        category_concentration=15.0,
        brand_loyalty=0.6,
        price_level=0.6,
        price_sensitivity=0.3,
        discount_sensitivity=0.3,
        hour_peaks=((23.3, 1.2, 1.0), (1.5, 1.0, 0.6)),
        devices={"desktop": 0.55, "mobile": 0.35, "app": 0.1},
        visits_per_week=3.5,
        weekend_factor=1.1,
        payday_visit_factor=1.2,
        session_views=7.0,
        view_gap_seconds=45.0,
        session_categories=2,
        revisit_rate=0.15,
        search_rate=0.65,
        cart_rate=0.06,
        checkout_rate=0.3,
        payday_checkout_factor=1.3,
        off_payday_checkout_factor=1.0,
        remove_rate=0.1,
        churn_rate=0.1,
        new_share=0.2,
        en_share=0.25,
        referrers={"google": 0.4, "": 0.3, "youtube": 0.2, "reddit": 0.1},
        search_words=("terbaru", "spesifikasi", "5g", "gaming", "original"),
        daily_purchase_rate=0.03,
        trigger_affinity={
            "cart_abandonment": 0.9, "price_drop": 1.6, "back_in_stock": 1.9, "new_arrivals": 1.5,
            "win_back": 0.8, "loyalty_reward": 0.8, "payday_promo": 1.0,
        },
        channel_affinity={"push": 1.1, "email": 1.2, "whatsapp": 0.8},
        message_conversion=0.12,
        tag_affinity={"gadget": 1.2, "flash-sale": 0.8, "paylater": 1.0, "harga-turun": 0.8, "baru": 0.5},
    ),
}  # fmt: skip

# Open rates for an average message at an average hour (before the saturation in `message_probabilities`).
CHANNEL_OPEN_RATE: Final = {"push": 0.12, "email": 0.18, "whatsapp": 0.3}
# Median delay between sending and opening, per channel (seconds).
CHANNEL_OPEN_DELAY: Final = {"push": 8 * 60.0, "email": 2 * 3600.0, "whatsapp": 5 * 60.0}

CITY_WEIGHTS: Final[dict[str, float]] = {
    "jakarta": 18, "surabaya": 8, "bandung": 8, "bekasi": 6, "tangerang": 6, "depok": 4, "medan": 6,
    "semarang": 4, "yogyakarta": 4, "palembang": 3, "bogor": 3, "malang": 3, "pekanbaru": 2, "padang": 2,
    "pontianak": 1.5, "solo": 2, "makassar": 4, "denpasar": 3, "balikpapan": 1.5, "manado": 1.5,
    "mataram": 1, "samarinda": 1.5, "banjarmasin": 1.5, "kupang": 1, "jayapura": 1, "ambon": 0.7,
    "sorong": 0.4, "merauke": 0.2, "ternate": 0.3,
}  # fmt: skip
CITY_REGIONS: Final[dict[str, str]] = {
    "jakarta": "DKI Jakarta", "bandung": "Jawa Barat", "bekasi": "Jawa Barat", "depok": "Jawa Barat",
    "bogor": "Jawa Barat", "surabaya": "Jawa Timur", "malang": "Jawa Timur", "semarang": "Jawa Tengah",
    "solo": "Jawa Tengah", "yogyakarta": "DI Yogyakarta", "medan": "Sumatera Utara",
    "palembang": "Sumatera Selatan", "tangerang": "Banten", "pekanbaru": "Riau", "padang": "Sumatera Barat",
    "pontianak": "Kalimantan Barat", "makassar": "Sulawesi Selatan", "denpasar": "Bali",
    "balikpapan": "Kalimantan Timur", "samarinda": "Kalimantan Timur", "manado": "Sulawesi Utara",
    "mataram": "Nusa Tenggara Barat", "banjarmasin": "Kalimantan Selatan", "kupang": "Nusa Tenggara Timur",
    "jayapura": "Papua", "ambon": "Maluku", "sorong": "Papua Barat Daya", "merauke": "Papua Selatan",
    "ternate": "Maluku Utara",
}  # fmt: skip
FIRST_NAMES: Final = (
    "Putri", "Siti", "Dewi", "Ayu", "Rina", "Indah", "Sari", "Intan", "Citra", "Nabila", "Aulia", "Fitri",
    "Dian", "Tika", "Wulan", "Anisa", "Nurul", "Rahma", "Salsabila", "Amelia", "Kartika", "Maya", "Ratna",
    "Budi", "Agus", "Andi", "Rizky", "Dimas", "Fajar", "Wahyu", "Yoga", "Bayu", "Adi", "Eko", "Hendra",
    "Reza", "Arif", "Ilham", "Gilang", "Taufik", "Yusuf", "Fikri", "Hafiz", "Irfan", "Kevin", "Michael",
    "Made", "Ketut", "Wayan", "Komang", "Nyoman", "Ucok", "Butet", "Asep", "Ujang", "Yohanes", "Maria",
    "Stefani", "Daniel", "Jessica", "Teguh", "Slamet", "Joko", "Sri", "Ningsih",
)  # fmt: skip


@dataclass(frozen=True)
class SimVisitor:
    """One simulated visitor: a pseudonymous id, the hidden type and the tastes sampled around it."""

    visitor_id: str
    hidden_type: str
    first_name: str
    city: str
    region: str
    locale: str
    device: str
    channel: str
    category_prefs: dict[str, float]  # sums to 1
    brand_prefs: dict[str, float]  # favourite brands -> utility bonus
    price_level: float
    price_sensitivity: float
    discount_sensitivity: float
    hour_weights: tuple[float, ...]  # 24 local hours, sums to 1
    visits_per_week: float
    session_views: float
    first_day: int  # day of the first visit, counted from `start`
    churn_day: int | None  # from this day on the visitor (almost) stops coming back

    @property
    def zone(self) -> timezone:
        return CITY_ZONES.get(self.city, WIB)

    @property
    def peak_hour(self) -> int:
        return int(np.argmax(self.hour_weights))

    def is_dormant(self, day: float) -> bool:
        return self.churn_day is not None and day >= self.churn_day
