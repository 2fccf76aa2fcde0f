"""The wording of explanations, in the shop's languages (Bahasa Indonesia and English).

Ranking decides *which* reason explains an item (a key and its values, in ranker.py and service.py); this module
says it in the visitor's language: `context.locale` of the request ("id", "id-ID", "en-US", ...), else the
shop's `RECOMMEND_DEFAULT_LOCALE`. A locale without its own wording falls back to English.
"""

from __future__ import annotations

from typing import Final, Literal

Locale = Literal["en", "id"]
LOCALES: Final[tuple[Locale, ...]] = ("en", "id")

PHRASES: Final[dict[str, dict[Locale, str]]] = {
    "viewed_in_category": {"en": "you viewed {n} items in {category}", "id": "kamu melihat {n} produk {category}"},
    "browses_category": {"en": "you often browse {category}", "id": "kamu sering melihat {category}"},
    "likes_brand": {"en": "you like {brand}", "id": "kamu suka {brand}"},
    "chosen_after": {"en": "often chosen after {title}", "id": "sering dipilih setelah {title}"},
    "chosen_by_people": {"en": "chosen by people who chose {title}", "id": "dipilih pembeli {title}"},
    "like_item": {"en": "like {title}", "id": "mirip {title}"},
    "seen_recently": {"en": "you looked at this recently", "id": "baru saja kamu lihat"},
    "in_cart": {"en": "still in your cart", "id": "masih ada di keranjangmu"},
    "discount": {"en": "{pct}% off", "id": "diskon {pct}%"},
    "trending": {"en": "trending {context}", "id": "lagi tren {context}"},
    "popular_with_buyers": {"en": "popular with buyers this week", "id": "laris minggu ini"},
    "new_arrival": {"en": "new arrival", "id": "produk baru"},
    "usual_price": {"en": "in your usual price range", "id": "sesuai kisaran harga favoritmu"},
    "payday": {"en": "payday pick", "id": "pilihan hari gajian"},
    "clicked_here": {"en": "often clicked here", "id": "sering diklik di sini"},
    "more_from_category": {"en": "more from {category}", "id": "lainnya dari {category}"},
    "recent_activity": {"en": "recommended from your recent activity", "id": "berdasarkan aktivitasmu"},
    "popular": {"en": "popular {context}", "id": "populer {context}"},
    "similar_to": {"en": "similar to {title}", "id": "mirip dengan {title}"},
    "bought_together": {"en": "often bought together with {title}", "id": "sering dibeli bersama {title}"},
    # For a browser key: no behaviour may be revealed, whatever the model used.
    "generic": {"en": "recommended for this page", "id": "rekomendasi untuk halaman ini"},
}
DAYPARTS: Final[dict[str, dict[Locale, str]]] = {
    "morning": {"en": "this morning", "id": "pagi ini"},
    "midday": {"en": "at lunchtime", "id": "siang ini"},
    "afternoon": {"en": "this afternoon", "id": "sore ini"},
    "evening": {"en": "this evening", "id": "malam ini"},
    "night": {"en": "tonight", "id": "malam ini"},
}


def locale_of(requested: str | None, default: Locale) -> Locale:
    """The wording's language for a request's `context.locale` (its language part), else the shop's default."""
    language = (requested or "").split("-")[0].split("_")[0].strip().lower()
    for locale in LOCALES:
        if language == locale:
            return locale
    return default


def say(locale: Locale, key: str, **values: object) -> str:
    return PHRASES[key][locale].format(**values)


def context_label(city: str | None, daypart: str, locale: Locale) -> str:
    """Where and when, as reasons say it: "in Jakarta this evening" / "di Jakarta malam ini"."""
    when = DAYPARTS[daypart][locale]
    if not city:
        return when
    return f"in {city} {when}" if locale == "en" else f"di {city} {when}"
