"""Behaviour traits of a visitor's feature row: what personas are learned from and described by."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypedDict

import numpy as np
import numpy.typing as npt

from services.common.context import daypart

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

MODEL_FORMAT: Final = 1

# Visitors with fewer events carry too little signal to shape the personas; they are still assigned.
MIN_EVENTS: Final = 5
# A persona needs a handful of members to mean anything, so k is only tried when n >= k * this.
MIN_VISITORS_PER_PERSONA: Final = 10
# Silhouette is O(n^2); a seeded sample of this size ranks the k's reliably and keeps a fit fast.
SILHOUETTE_SAMPLE: Final = 3000
# Scaled values are clipped so that a few extreme visitors cannot pull a centre (or form a cluster).
CLIP: Final = 4.0
# A trait is worth mentioning to a marketer only if the persona differs from average by at least this factor.
NOTABLE_RATIO: Final = 1.25
# Ratios beyond this say nothing more to a reader ("far more than average"); it also keeps JSON finite.
RATIO_CAP: Final = 100.0
# How many traits a description mentions and `top_traits` lists.
TOP_TRAITS: Final = 3
EPS: Final = 1e-9

# Category slugs -> the coarse groups the traits use. Slugs are shop-defined ("fashion-wanita",
# "aksesoris-handphone"), so a slug matches when any of its dash-separated tokens is listed here.
# Kept deliberately small: only the groups that separate personas well in Indonesian marketplaces.
CATEGORY_GROUPS: Final[dict[str, str]] = {
    "fashion": "fashion_beauty",
    "pakaian": "fashion_beauty",
    "baju": "fashion_beauty",
    "sepatu": "fashion_beauty",
    "tas": "fashion_beauty",
    "hijab": "fashion_beauty",
    "muslim": "fashion_beauty",
    "kecantikan": "fashion_beauty",
    "kosmetik": "fashion_beauty",
    "skincare": "fashion_beauty",
    "perawatan": "fashion_beauty",
    "beauty": "fashion_beauty",
    "elektronik": "electronics",
    "electronics": "electronics",
    "handphone": "electronics",
    "hp": "electronics",
    "smartphone": "electronics",
    "gadget": "electronics",
    "laptop": "electronics",
    "komputer": "electronics",
    "kamera": "electronics",
    "audio": "electronics",
    "gaming": "electronics",
}

# Devices that count as "on a phone" for the mobile-share trait.
MOBILE_DEVICES: Final = frozenset({"mobile", "app"})
DESKTOP_DEVICES: Final = frozenset({"desktop", "tablet"})


@dataclass(frozen=True)
class Trait:
    """One behavioural trait: how it is phrased and named when a persona stands out on it.

    `log` traits are heavy-tailed (counts, prices, money): they are scaled after log1p, and their "average"
    is the geometric mean, so one whale does not define what is typical. Phrases take {r}, the ratio.
    Names are (Indonesian, English) pairs used when the trait is the persona's most distinctive one
    (distinctiveness = |z| x name_weight).
    """

    name: str
    log: bool
    high_en: str
    low_en: str
    high_id: str
    low_id: str
    name_high: tuple[str, str] | None = None
    name_low: tuple[str, str] | None = None
    # How much the trait says about *who* a shopper is, for picking the name: what they buy and how they
    # decide (1.0) outranks when and on which device they shop (0.5), which the description tells instead.
    name_weight: float = 1.0


TRAITS: Final[tuple[Trait, ...]] = (
    Trait(
        "views_30d",
        True,
        "{r}× more product views than average",
        "{r}× fewer product views than average",
        "{r}× lebih banyak melihat produk dibanding rata-rata",
        "{r}× lebih jarang melihat produk dibanding rata-rata",
        ("Penjelajah Aktif", "Active Browser"),
        ("Pengunjung Santai", "Casual Visitor"),
        name_weight=0.8,
    ),
    Trait(
        "session_depth",
        True,
        "sessions {r}× deeper than average",
        "sessions {r}× shorter than average",
        "sesi {r}× lebih panjang dibanding rata-rata",
        "sesi {r}× lebih singkat dibanding rata-rata",
        ("Peneliti Teliti", "Careful Researcher"),
        ("Pembeli Kilat", "Quick Buyer"),
    ),
    Trait(
        "cart_rate",
        False,
        "adds to cart {r}× more often per view than average",
        "adds to cart {r}× less often per view than average",
        "{r}× lebih sering memasukkan ke keranjang dibanding rata-rata",
        "{r}× lebih jarang memasukkan ke keranjang dibanding rata-rata",
        ("Pengisi Keranjang", "Cart Filler"),
        None,
        name_weight=0.8,
    ),
    Trait(
        "purchase_rate",
        False,
        "buys {r}× more often per view than average",
        "buys {r}× less often per view than average",
        "{r}× lebih cepat membeli per produk dilihat dibanding rata-rata",
        "{r}× lebih jarang membeli per produk dilihat dibanding rata-rata",
        ("Pembeli Kilat", "Quick Buyer"),
        ("Peneliti Teliti", "Careful Researcher"),
    ),
    Trait(
        "purchases_30d",
        True,
        "{r}× more purchases than average",
        "{r}× fewer purchases than average",
        "{r}× lebih banyak pembelian dibanding rata-rata",
        "{r}× lebih sedikit pembelian dibanding rata-rata",
        ("Pelanggan Setia", "Loyal Customer"),
        None,
    ),
    Trait(
        "price_viewed",
        True,
        "views products priced {r}× higher than average",
        "views products priced {r}× lower than average",
        "melihat produk dengan harga {r}× lebih tinggi dibanding rata-rata",
        "melihat produk dengan harga {r}× lebih rendah dibanding rata-rata",
        ("Pembeli Premium", "Premium Shopper"),
        ("Pembelanja Hemat", "Budget Shopper"),
    ),
    Trait(
        "discount_affinity",
        False,
        "{r}× stronger preference for discounted items than average",
        "{r}× weaker preference for discounted items than average",
        "{r}× lebih suka produk diskon dibanding rata-rata",
        "{r}× kurang tertarik produk diskon dibanding rata-rata",
        ("Pemburu Diskon", "Deal Hunter"),
        None,
    ),
    Trait(
        "discount_view_share",
        False,
        "{r}× more discount views than average",
        "{r}× fewer discount views than average",
        "{r}× lebih sering melihat produk diskon dibanding rata-rata",
        "{r}× lebih jarang melihat produk diskon dibanding rata-rata",
        ("Pemburu Diskon", "Deal Hunter"),
        None,
    ),
    Trait(
        "morning_share",
        False,
        "{r}× more activity in the morning (05-11) than average",
        "{r}× less activity in the morning (05-11) than average",
        "{r}× lebih aktif di pagi hari (05-11) dibanding rata-rata",
        "{r}× lebih jarang aktif di pagi hari (05-11) dibanding rata-rata",
        ("Pembelanja Pagi", "Early Bird"),
        None,
        name_weight=0.5,
    ),
    Trait(
        "midday_share",
        False,
        "{r}× more activity at midday (11-15) than average",
        "{r}× less activity at midday (11-15) than average",
        "{r}× lebih aktif di siang hari (11-15) dibanding rata-rata",
        "{r}× lebih jarang aktif di siang hari (11-15) dibanding rata-rata",
        ("Pembelanja Jam Istirahat", "Lunch-break Shopper"),
        None,
        name_weight=0.5,
    ),
    Trait(
        "afternoon_share",
        False,
        "{r}× more activity in the afternoon (15-19) than average",
        "{r}× less activity in the afternoon (15-19) than average",
        "{r}× lebih aktif di sore hari (15-19) dibanding rata-rata",
        "{r}× lebih jarang aktif di sore hari (15-19) dibanding rata-rata",
        ("Pembelanja Sore", "Afternoon Shopper"),
        None,
        name_weight=0.5,
    ),
    Trait(
        "evening_share",
        False,
        "{r}× more activity in the evening (19-23) than average",
        "{r}× less activity in the evening (19-23) than average",
        "{r}× lebih aktif di malam hari (19-23) dibanding rata-rata",
        "{r}× lebih jarang aktif di malam hari (19-23) dibanding rata-rata",
        ("Pembelanja Malam", "Evening Shopper"),
        None,
        name_weight=0.5,
    ),
    Trait(
        "night_share",
        False,
        "{r}× more activity late at night (23-05) than average",
        "{r}× less activity late at night (23-05) than average",
        "{r}× lebih aktif larut malam (23-05) dibanding rata-rata",
        "{r}× lebih jarang aktif larut malam (23-05) dibanding rata-rata",
        ("Burung Hantu", "Night Owl"),
        None,
        name_weight=0.5,
    ),
    Trait(
        "payday_purchase_share",
        False,
        "{r}× more of their purchases around payday than average",
        "{r}× less of their purchases around payday than average",
        "{r}× lebih sering belanja saat gajian dibanding rata-rata",
        "{r}× lebih jarang belanja saat gajian dibanding rata-rata",
        ("Pembeli Gajian", "Payday Shopper"),
        None,
        name_weight=0.8,
    ),
    Trait(
        "mobile_share",
        False,
        "{r}× more likely to shop on mobile than average",
        "{r}× less likely to shop on mobile than average",
        "{r}× lebih sering belanja lewat ponsel dibanding rata-rata",
        "{r}× lebih jarang belanja lewat ponsel dibanding rata-rata",
        ("Anak Mobile", "Mobile Shopper"),
        ("Pengguna Desktop", "Desktop Shopper"),
        name_weight=0.5,
    ),
    Trait(
        "fashion_beauty_share",
        False,
        "{r}× more interest in fashion & beauty than average",
        "{r}× less interest in fashion & beauty than average",
        "{r}× lebih tertarik fashion & kecantikan dibanding rata-rata",
        "{r}× kurang tertarik fashion & kecantikan dibanding rata-rata",
        ("Pecinta Fashion", "Fashion Lover"),
        None,
    ),
    Trait(
        "electronics_share",
        False,
        "{r}× more interest in electronics & gadgets than average",
        "{r}× less interest in electronics & gadgets than average",
        "{r}× lebih tertarik elektronik & gadget dibanding rata-rata",
        "{r}× kurang tertarik elektronik & gadget dibanding rata-rata",
        ("Penggemar Gadget", "Gadget Fan"),
        None,
    ),
    Trait(
        "brand_concentration",
        False,
        "{r}× more focused on one brand than average",
        "{r}× less focused on one brand than average",
        "{r}× lebih setia pada satu merek dibanding rata-rata",
        "{r}× kurang setia pada satu merek dibanding rata-rata",
        ("Setia Merek", "Brand Loyalist"),
        ("Penjelajah Merek", "Brand Explorer"),
        name_weight=0.8,
    ),
    Trait(
        "monetary",
        True,
        "spends {r}× more than average",
        "spends {r}× less than average",
        "berbelanja {r}× lebih besar dibanding rata-rata",
        "berbelanja {r}× lebih kecil dibanding rata-rata",
        ("Pelanggan Sultan", "Big Spender"),
        None,
    ),
)
TRAIT_NAMES: Final[tuple[str, ...]] = tuple(t.name for t in TRAITS)
_TRAIT_BY_NAME: Final[dict[str, Trait]] = {t.name: t for t in TRAITS}
LOG_MASK: Final = np.array([t.log for t in TRAITS], dtype=bool)
# When no trait yields a free name (rare: two personas that differ only weakly), these are used in order.
FALLBACK_NAMES: Final[tuple[tuple[str, str], ...]] = (
    ("Pengunjung Umum", "Everyday Visitor"),
    ("Pembelanja Reguler", "Regular Shopper"),
)
_DAYPARTS: Final = ("morning", "midday", "afternoon", "evening", "night")
_HOUR_TO_DAYPART: Final = np.array([_DAYPARTS.index(daypart(h)) for h in range(24)])


class TopTrait(TypedDict):
    trait: str
    value: float
    population_mean: float
    ratio: float


# --------------------------------------------------------------------------------------------- traits


def _num(row: Mapping[str, object], key: str) -> float:
    """A numeric feature as float; missing, None, NaN, ±inf and non-numbers all read as NaN."""
    return _as_float(row.get(key))


def _as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return math.nan
    number = float(value)
    return number if math.isfinite(number) else math.nan


def _floats(row: Mapping[str, object], key: str) -> list[float]:
    value = row.get(key)
    if not isinstance(value, Sequence | np.ndarray) or isinstance(value, str):
        return []
    return [_as_float(v) for v in value]


def _strs(row: Mapping[str, object], key: str) -> list[str]:
    value = row.get(key)
    if not isinstance(value, Sequence | np.ndarray) or isinstance(value, str):
        return []
    return [v if isinstance(v, str) else "" for v in value]


def _ratio(numerator: float, denominator: float) -> float:
    """A per-view rate; undefined (NaN) without views rather than a misleading 0."""
    if not denominator > 0 or math.isnan(numerator):
        return math.nan
    return numerator / denominator


def category_group(slug: str) -> str | None:
    """The coarse group of a category slug ("fashion-wanita" -> "fashion_beauty"), None when unknown."""
    for token in slug.lower().replace("_", "-").split("-"):
        group = CATEGORY_GROUPS.get(token)
        if group is not None:
            return group
    return None


def _group_shares(row: Mapping[str, object]) -> tuple[float, float]:
    categories = _strs(row, "top_categories")
    scores = _floats(row, "top_category_scores")
    pairs = [(c, s) for c, s in zip(categories, scores, strict=False) if s > 0]
    total = sum(s for _, s in pairs)
    if total <= 0:
        return math.nan, math.nan
    fashion = sum(s for c, s in pairs if category_group(c) == "fashion_beauty")
    electronics = sum(s for c, s in pairs if category_group(c) == "electronics")
    return fashion / total, electronics / total


def _daypart_shares(row: Mapping[str, object]) -> list[float]:
    hist = np.asarray(_floats(row, "hour_histogram"), dtype=np.float64)
    if hist.shape != (24,) or not np.all(np.isfinite(hist)) or hist.sum() <= 0:
        return [math.nan] * len(_DAYPARTS)
    # Normalise again: the writer promises a sum of 1, but rounding or old rows must not shift the shares.
    shares = np.bincount(_HOUR_TO_DAYPART, weights=hist / hist.sum(), minlength=len(_DAYPARTS))
    return [float(s) for s in shares]


def _trait_row(row: Mapping[str, object]) -> list[float]:
    views = _num(row, "views_30d")
    device = row.get("preferred_device")
    device = device if isinstance(device, str) else ""
    if device in MOBILE_DEVICES:
        mobile = 1.0
    elif device in DESKTOP_DEVICES:
        mobile = 0.0
    else:
        mobile = math.nan
    brand_scores = [s for s in _floats(row, "top_brand_scores") if s > 0]
    brand = max(brand_scores) / sum(brand_scores) if brand_scores else math.nan
    fashion, electronics = _group_shares(row)
    discount_share = _ratio(_num(row, "discount_views_30d"), views)
    values = [
        views,
        _num(row, "session_depth"),
        _ratio(_num(row, "carts_30d"), views),
        _ratio(_num(row, "purchases_30d"), views),
        _num(row, "purchases_30d"),
        _num(row, "typical_price_viewed"),
        _num(row, "discount_affinity"),
        min(discount_share, 1.0) if not math.isnan(discount_share) else math.nan,
        *_daypart_shares(row),
        _num(row, "payday_purchase_share"),
        mobile,
        fashion,
        electronics,
        brand,
        _num(row, "rfm_monetary"),
    ]
    # Negative counts/prices are corrupt input; treat them as missing rather than let log1p produce NaN/-inf.
    return [v if v >= 0 else math.nan for v in values]


def behaviour_matrix(rows: Sequence[Mapping[str, object]]) -> tuple[FloatArray, list[str]]:
    """Visitor feature rows -> (n x len(TRAITS)) matrix of interpretable traits (NaN = unknown), trait names.

    Values are in natural units (counts, IDR, shares in [0, 1]); logs are applied by the scaler, so the
    matrix itself stays readable.
    """
    matrix = np.array([_trait_row(r) for r in rows], dtype=np.float64).reshape(len(rows), len(TRAITS))
    return matrix, list(TRAIT_NAMES)


def active_mask(rows: Sequence[Mapping[str, object]]) -> npt.NDArray[np.bool_]:
    """Which visitors have enough activity to shape the personas (event_count >= MIN_EVENTS).

    Rows without event_count fall back to their 30-day views + carts + purchases.
    """
    out = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        events = _num(row, "event_count")
        if math.isnan(events):
            parts = [_num(row, k) for k in ("views_30d", "carts_30d", "purchases_30d")]
            events = sum(p for p in parts if not math.isnan(p))
        out[i] = events >= MIN_EVENTS
    return out


def standardize(
    matrix: FloatArray, log: npt.NDArray[np.bool_], center: FloatArray, scale: FloatArray, clip: float
) -> FloatArray:
    x = np.array(matrix, dtype=np.float64, copy=True)
    x[:, log] = np.log1p(x[:, log])
    z = (x - center) / scale
    # Unknown traits sit at the population median (0), so missing data never pushes a visitor anywhere.
    z[np.isnan(z)] = 0.0
    return np.clip(z, -clip, clip)
