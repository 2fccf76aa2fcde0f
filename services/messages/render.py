"""Tone and rendering: short or detailed text for the visitor, prices in the locale's format, {token}s filled
with values escaped per channel (HTML for e-mail, plain single lines for push and WhatsApp, percent-encoded in
deep links)."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import quote

from services.features.item_cache import ItemSnapshot
from services.features.schema import as_number
from services.messages.eligibility import Candidate
from services.messages.model import VisitorView
from services.messages.templates import Template

_TOKEN = re.compile(r"\{([a-z_]+)\}")

# Persona traits (services/profile/personas.py) that call for a detailed, reassuring message, or a short one.
DETAILED_SIGNS: Final = {("session_depth", 1), ("views_30d", 1), ("purchase_rate", -1), ("cart_rate", -1)}
SHORT_SIGNS: Final = {
    ("session_depth", -1),
    ("purchase_rate", 1),
    ("discount_affinity", 1),
    ("discount_view_share", 1),
    ("cart_rate", 1),
}
DETAILED_NAMES: Final = ("researcher", "careful")
SHORT_NAMES: Final = ("quick", "deal hunter", "bargain")


def tone_for(view: VisitorView, persona: Mapping[str, Any] | None) -> tuple[str, str]:
    """(tone, why): from the persona's traits when personas exist, else from browsing behaviour."""
    if persona:
        name = str(persona.get("name_en") or "").lower()
        detailed = short = 0.0
        for trait in persona.get("top_traits") or ():
            if not isinstance(trait, Mapping):
                continue
            direction = 1 if as_number(trait.get("value")) > as_number(trait.get("population_mean")) else -1
            key = (str(trait.get("trait")), direction)
            detailed += key in DETAILED_SIGNS
            short += key in SHORT_SIGNS
        detailed += 2 * any(word in name for word in DETAILED_NAMES)
        short += 2 * any(word in name for word in SHORT_NAMES)
        if detailed != short:
            label = persona.get("name_en") or f"persona {persona.get('persona_id')}"
            return ("detailed" if detailed > short else "short"), f"persona {label}"
    depth = view.value("session_depth")
    views = view.value("views_30d")
    per_order = views / max(view.orders, 1) if views == views else math.nan
    # Careful researchers browse deep sessions and view many products per order.
    if (depth == depth and depth >= 12) or (per_order == per_order and views >= 20 and per_order >= 40):
        return "detailed", "browses many products before buying"
    return "short", "decides quickly"


def format_price(price: float, locale: str) -> str:
    whole = f"{round(price):,}"
    return f"Rp{whole.replace(',', '.')}" if locale == "id" else f"Rp{whole}"


FALLBACK_NAME: Final = {"id": "Kak", "en": "friend"}


# Control characters (C0, DEL, C1: CR/LF would start new header or text lines), zero-width and bidi controls
# (an RLO can make "gnp.exe" read as "exe.png"): never in a message. Other whitespace runs become one space.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]+")
_SPACES = re.compile(r"\s+")
MAX_NAME_CHARS: Final = 40


def plain(value: str) -> str:
    """A token value as one line of plain text: control characters become spaces, spaces are collapsed."""
    return _SPACES.sub(" ", _CONTROL.sub(" ", value)).strip()


def escape_for(channel: str) -> Callable[[str], str]:
    """How token values enter a channel's text: e-mail bodies are HTML, so values are HTML-escaped (a name
    cannot add markup or links); push and WhatsApp are plain text, so values are plain single lines."""
    if channel == "email":
        return lambda value: html.escape(plain(value), quote=True)
    return plain


def link_value(value: str) -> str:
    """A token value inside a deep link: percent-encoded, so it stays one path segment or query value (a "/",
    "?", "#" or "&" in an id or category cannot change where the link goes)."""
    return quote(plain(value), safe="")


def fill(text: str, tokens: Mapping[str, str], escape: Callable[[str], str] = plain) -> str:
    """Replace {token}s with `escape`d values (unknown tokens become empty: a half-filled sentence beats a
    literal brace). The template text itself is the shop's and is kept as written."""
    return _TOKEN.sub(lambda m: escape(tokens.get(m.group(1), "")), text)


def deep_link(template: Template, tokens: Mapping[str, str]) -> str:
    return fill(template.deep_link, tokens, link_value)


def render(
    template: Template, locale: str, tone: str, tokens: Mapping[str, str], channel: str
) -> tuple[str, str, str, str]:
    """(title, body, locale, tone) actually used: falls back to Indonesian, then any locale/tone present.
    Token values are escaped for `channel` (`escape_for`)."""
    texts = template.texts
    used_locale = locale if locale in texts else ("id" if "id" in texts else next(iter(texts)))
    tones = texts[used_locale]
    used_tone = tone if tone in tones else ("short" if "short" in tones else next(iter(tones)))
    parts = tones[used_tone]
    escape = escape_for(channel)
    title = fill(parts.get("title", ""), tokens, escape).strip()
    body = fill(parts.get("body", ""), tokens, escape).strip()
    return title[:1].upper() + title[1:], body[:1].upper() + body[1:], used_locale, used_tone


def tokens_for(
    view: VisitorView,
    chosen: Candidate,
    traits: Mapping[str, Any],
    snapshot: ItemSnapshot,
    locale: str,
    voucher_discount: float,
) -> dict[str, str]:
    """The {token} values of a chosen message: the visitor's first name, the product and its price, the
    category and the discount (`voucher_discount` when the message has no discounted product)."""
    product = chosen.product
    name = traits.get("first_name")
    # The first word of the plain name (a "first name" of "Ana\r\nBcc: x" is "Ana"), of a sane length.
    words = plain(name).split(" ") if isinstance(name, str) else []
    first_name = words[0][:MAX_NAME_CHARS].title() if words and words[0] else ""
    discount = float(snapshot.discount[product]) if product >= 0 else 0.0
    if discount <= 0:
        discount = voucher_discount
    category = (snapshot.categories[product] if product >= 0 else None) or (
        view.categories[0] if view.categories else ""
    )
    tokens = {
        "first_name": first_name or FALLBACK_NAME.get(locale, "friend"),
        "category": category.replace("-", " "),
        "discount": f"{round(discount * 100)}%",
    }
    if product >= 0:
        price = float(snapshot.price[product])
        tokens.update(
            product=snapshot.titles[product],
            price=format_price(price, locale) if price == price else "",
            item_id=snapshot.ids[product],
            brand=snapshot.brands[product] or "",
        )
    return tokens
