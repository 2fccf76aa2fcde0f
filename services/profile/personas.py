"""Personas learned from visitor behaviour: interpretable traits -> scaling -> KMeans -> named.

Marketers read the personas, so everything here is chosen to be explainable:
  * the clustering space is a short list of behavioural traits with plain meanings (`TRAITS`);
  * the number of personas is picked by the Davies-Bouldin index (silhouette is reported too), and every
    candidate k's scores are kept in the model;
  * names and descriptions come from the traits that set a persona's centre apart from the population,
    phrased as ratios ("3,1× lebih sering melihat produk diskon dibanding rata-rata");
  * persona ids survive a refit: new centres are matched to the previous model's (Hungarian assignment),
    so targeting rules and dashboards keyed by persona id keep their meaning.

Pure module: no Redis/Feast/I/O beyond JSON (de)serialisation of a `PersonaModel`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Final, TypedDict

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import davies_bouldin_score, silhouette_score

from services.common.clock import wall_datetime
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
_EPS: Final = 1e-9

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
_LOG_MASK: Final = np.array([t.log for t in TRAITS], dtype=bool)
# When no trait yields a free name (rare: two personas that differ only weakly), these are used in order.
_FALLBACK_NAMES: Final[tuple[tuple[str, str], ...]] = (
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


# --------------------------------------------------------------------------------------------- model


@dataclass
class Persona:
    persona_id: int
    name_id: str
    name_en: str
    description_id: str
    description_en: str
    size: int
    share: float
    top_traits: list[TopTrait]


@dataclass
class PersonaModel:
    """A fitted persona model: scaler, centres (in scaled space) and the personas they stand for.

    `centres[i]` belongs to `personas[i]`. `retired_ids` are the previous model's ids that found no match
    in this fit; `next_id` is the first id never used by this model or its ancestors, so ids are not reused.
    """

    version: int
    created_at: str
    k: int
    silhouette_by_k: dict[int, float]
    trait_names: list[str]
    log_traits: list[bool]
    center: list[float]
    scale: list[float]
    clip: float
    centres: list[list[float]]
    personas: list[Persona]
    retired_ids: list[int] = field(default_factory=list)
    next_id: int = 1
    n_fit: int = 0
    seed: int = 0
    # The criterion that chose k (lower is better); silhouette is kept for the report.
    davies_bouldin_by_k: dict[int, float] = field(default_factory=dict)
    _centres: FloatArray = field(init=False, repr=False, compare=False)
    _centre_sq: FloatArray = field(init=False, repr=False, compare=False)
    _ids: IntArray = field(init=False, repr=False, compare=False)
    _center: FloatArray = field(init=False, repr=False, compare=False)
    _scale: FloatArray = field(init=False, repr=False, compare=False)
    _log: npt.NDArray[np.bool_] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Arrays are cached once so that assigning one visitor is a few small numpy ops (well under 0.2 ms).
        self._centres = np.asarray(self.centres, dtype=np.float64)
        self._centre_sq = (self._centres**2).sum(axis=1)
        self._ids = np.array([p.persona_id for p in self.personas], dtype=np.int64)
        self._center = np.asarray(self.center, dtype=np.float64)
        self._scale = np.asarray(self.scale, dtype=np.float64)
        self._log = np.asarray(self.log_traits, dtype=bool)
        if self._centres.shape != (len(self.personas), len(self.trait_names)):
            raise ValueError("persona model is inconsistent: centres do not match personas x traits")

    @property
    def persona_ids(self) -> list[int]:
        return [p.persona_id for p in self.personas]

    def persona(self, persona_id: int) -> Persona:
        for p in self.personas:
            if p.persona_id == persona_id:
                return p
        raise KeyError(persona_id)

    def transform(self, matrix: FloatArray) -> FloatArray:
        """Trait matrix -> scaled clustering space (log1p where flagged, robust scaling, clip, NaN -> 0)."""
        return _scale(matrix, self._log, self._center, self._scale, self.clip)

    def assign_matrix(self, matrix: FloatArray) -> IntArray:
        """Persona id of each row of a trait matrix (nearest centre in scaled space)."""
        z = self.transform(matrix)
        # |z - c|^2 = |z|^2 - 2 z.c + |c|^2; |z|^2 is the same for every centre, so it is dropped.
        distances = self._centre_sq[None, :] - 2.0 * (z @ self._centres.T)
        return self._ids[np.argmin(distances, axis=1)]

    def assign(self, rows: Sequence[Mapping[str, object]]) -> IntArray:
        """Persona id for each visitor row (any activity level; unknown traits count as typical)."""
        matrix, names = behaviour_matrix(rows)
        if names != self.trait_names:
            raise ValueError("persona model was fitted on other traits; refit it with this code version")
        return self.assign_matrix(matrix)

    def to_json(self) -> str:
        data = {
            "format": MODEL_FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "k": self.k,
            "silhouette_by_k": {str(k): v for k, v in self.silhouette_by_k.items()},
            "davies_bouldin_by_k": {str(k): v for k, v in self.davies_bouldin_by_k.items()},
            "trait_names": self.trait_names,
            "log_traits": self.log_traits,
            "center": self.center,
            "scale": self.scale,
            "clip": self.clip,
            "centres": self.centres,
            "personas": [asdict(p) for p in self.personas],
            "retired_ids": self.retired_ids,
            "next_id": self.next_id,
            "n_fit": self.n_fit,
            "seed": self.seed,
        }
        # Python's float repr round-trips exactly, so a reloaded model assigns identically.
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PersonaModel:
        data = json.loads(text)
        if data.get("format") != MODEL_FORMAT:
            raise ValueError(f"unsupported persona model format {data.get('format')!r}")
        personas = [
            Persona(
                persona_id=int(p["persona_id"]),
                name_id=str(p["name_id"]),
                name_en=str(p["name_en"]),
                description_id=str(p["description_id"]),
                description_en=str(p["description_en"]),
                size=int(p["size"]),
                share=float(p["share"]),
                top_traits=[
                    TopTrait(
                        trait=str(t["trait"]),
                        value=float(t["value"]),
                        population_mean=float(t["population_mean"]),
                        ratio=float(t["ratio"]),
                    )
                    for t in p["top_traits"]
                ],
            )
            for p in data["personas"]
        ]
        return cls(
            version=int(data["version"]),
            created_at=str(data["created_at"]),
            k=int(data["k"]),
            silhouette_by_k={int(k): float(v) for k, v in data["silhouette_by_k"].items()},
            davies_bouldin_by_k={int(k): float(v) for k, v in data.get("davies_bouldin_by_k", {}).items()},
            trait_names=[str(n) for n in data["trait_names"]],
            log_traits=[bool(b) for b in data["log_traits"]],
            center=[float(v) for v in data["center"]],
            scale=[float(v) for v in data["scale"]],
            clip=float(data["clip"]),
            centres=[[float(v) for v in c] for c in data["centres"]],
            personas=personas,
            retired_ids=[int(i) for i in data["retired_ids"]],
            next_id=int(data["next_id"]),
            n_fit=int(data["n_fit"]),
            seed=int(data["seed"]),
        )


# --------------------------------------------------------------------------------------------- fitting


def _scale(
    matrix: FloatArray, log: npt.NDArray[np.bool_], center: FloatArray, scale: FloatArray, clip: float
) -> FloatArray:
    x = np.array(matrix, dtype=np.float64, copy=True)
    x[:, log] = np.log1p(x[:, log])
    z = (x - center) / scale
    # Unknown traits sit at the population median (0), so missing data never pushes a visitor anywhere.
    z[np.isnan(z)] = 0.0
    return np.clip(z, -clip, clip)


def _fit_scaler(matrix: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Mean / standard deviation per trait, on log1p values for heavy-tailed traits.

    Whales and bots cannot pull a centre far: scaled values are clipped at ±CLIP. (A median/IQR scaler was
    tried first: on the demo shop it blew zero-inflated traits up and split one visitor type on them while
    merging two others; ARI against the simulator's types fell from 0.94 to 0.69.)
    """
    x = matrix.copy()
    x[:, _LOG_MASK] = np.log1p(x[:, _LOG_MASK])
    center = np.zeros(x.shape[1])
    scale = np.ones(x.shape[1])
    for j in range(x.shape[1]):
        col = x[:, j][~np.isnan(x[:, j])]
        if col.size == 0:
            continue
        center[j] = float(col.mean())
        std = float(col.std())
        if std > _EPS:
            scale[j] = std
    return center, scale


def _typical(values: FloatArray, log: bool) -> float:
    """The 'average' a marketer compares with: the mean, or for heavy-tailed traits the geometric mean."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return math.nan
    if log:
        return float(np.expm1(np.log1p(v).mean()))
    return float(v.mean())


def _fmt_ratio(r: float, locale: str) -> str:
    text = f"{r:.1f}" if r < 10 else f"{r:.0f}"
    return text.replace(".", ",") if locale == "id" else text


def _phrase(trait: Trait, ratio: float, locale: str) -> str:
    high = ratio >= 1.0
    r = ratio if high else (1.0 / ratio if ratio > _EPS else math.inf)
    # A persona that (almost) never does something is better said as such than as "100× less".
    if r > 20:
        r = 20.0
        prefix = ">" if locale == "en" else "lebih dari "
    else:
        prefix = ""
    template = {
        ("en", True): trait.high_en,
        ("en", False): trait.low_en,
        ("id", True): trait.high_id,
        ("id", False): trait.low_id,
    }[(locale, high)]
    return template.format(r=prefix + _fmt_ratio(r, locale))


@dataclass
class _Profile:
    """What sets one cluster apart: traits ordered by |z| of its centre vs the population."""

    order: list[int]
    z: FloatArray
    value: list[float]
    population: list[float]
    ratio: list[float]


def _trait_ratio(value: float, population: float) -> float:
    if math.isnan(value) or math.isnan(population):
        # A trait nobody reported carries no information: ratio 1 keeps it out of names and text.
        return 1.0
    if population <= _EPS:
        return 1.0 if value <= _EPS else RATIO_CAP
    # Capped so the model's JSON stays standard (no Infinity) when the population almost never shows a trait.
    return min(value / population, RATIO_CAP)


def _profiles(matrix: FloatArray, z_space: FloatArray, labels: IntArray, k: int) -> list[_Profile]:
    pop_mean = z_space.mean(axis=0)
    pop_std = np.maximum(z_space.std(axis=0), _EPS)
    population = [_typical(matrix[:, j], TRAITS[j].log) for j in range(len(TRAITS))]
    out: list[_Profile] = []
    for c in range(k):
        members = labels == c
        z = (z_space[members].mean(axis=0) - pop_mean) / pop_std
        value = [_typical(matrix[members, j], TRAITS[j].log) for j in range(len(TRAITS))]
        ratio = [_trait_ratio(v, p) for v, p in zip(value, population, strict=True)]
        order = sorted(range(len(TRAITS)), key=lambda j: -abs(float(z[j])))
        out.append(_Profile(order, z, value, population, ratio))
    return out


def _notable(profile: _Profile, j: int) -> bool:
    r = profile.ratio[j]
    return r >= NOTABLE_RATIO or r <= 1.0 / NOTABLE_RATIO


def _name_personas(profiles: list[_Profile], ids: list[int]) -> list[tuple[tuple[str, str], int | None]]:
    """Distinct (Indonesian, English) names, and the trait each name comes from (None for a fallback name).

    Greedy over all (persona, trait) pairs, most distinctive first (|z| x name_weight): each persona takes the
    name of its most distinctive trait that no other persona has taken yet.
    """
    candidates: list[tuple[float, int, int, tuple[str, str]]] = []
    for c, prof in enumerate(profiles):
        for j in prof.order:
            if not _notable(prof, j):
                continue
            trait = TRAITS[j]
            name = trait.name_high if prof.ratio[j] >= 1.0 else trait.name_low
            if name is not None:
                candidates.append((abs(float(prof.z[j])) * trait.name_weight, c, j, name))
    chosen: list[tuple[tuple[str, str], int | None] | None] = [None] * len(profiles)
    used: set[str] = set()
    for _, c, j, name in sorted(candidates, key=lambda t: (-t[0], t[1], t[2])):
        if chosen[c] is None and name[1] not in used:
            chosen[c] = (name, j)
            used.add(name[1])
    fallback = iter(_FALLBACK_NAMES)
    out: list[tuple[tuple[str, str], int | None]] = []
    for c, maybe in enumerate(chosen):
        if maybe is None:
            generic = (f"Persona {ids[c]}", f"Persona {ids[c]}")
            name = next((f for f in fallback if f[1] not in used), generic)
            used.add(name[1])
            maybe = (name, None)
        out.append(maybe)
    return out


def _describe(profile: _Profile, name: tuple[str, str], name_trait: int | None) -> tuple[str, str, list[TopTrait]]:
    """Description from the most distinctive notable traits, led by the one the name comes from."""
    notable = [j for j in profile.order if _notable(profile, j)]
    if name_trait is not None:
        notable = [name_trait, *(j for j in notable if j != name_trait)]
    picked = notable[:TOP_TRAITS] or profile.order[:1]
    top: list[TopTrait] = [
        TopTrait(
            trait=TRAITS[j].name,
            value=profile.value[j],
            population_mean=profile.population[j],
            ratio=profile.ratio[j],
        )
        for j in picked
    ]
    if not notable:
        return (
            f"{name[0]}: perilaku mendekati rata-rata pengunjung.",
            f"{name[1]}: behaves close to the average visitor.",
            top,
        )
    text_id = "; ".join(_phrase(TRAITS[j], profile.ratio[j], "id") for j in picked)
    text_en = "; ".join(_phrase(TRAITS[j], profile.ratio[j], "en") for j in picked)
    return f"{name[0]}: {text_id}.", f"{name[1]}: {text_en}.", top


def _match_ids(
    previous: PersonaModel, matrix: FloatArray, labels: IntArray, k: int
) -> tuple[list[int], list[int], int]:
    """Ids for the new clusters: matched to the previous model's centres where they still describe the same
    behaviour, fresh otherwise. Returns (id per new cluster, retired old ids, next free id).

    Distances are taken in the *previous* model's scaled space (the new clusters' members, scaled the old
    way), so the comparison does not depend on how the new scaler moved. A match is kept only when the new
    centre is closer to the old one than half the way to that old centre's nearest neighbour: Hungarian
    assignment always pairs something, and a genuinely new behaviour must not inherit an old persona's id.
    """
    old = previous._centres
    z_old = previous.transform(matrix)
    new_in_old = np.vstack([z_old[labels == c].mean(axis=0) for c in range(k)])
    cost = np.sqrt(((new_in_old[:, None, :] - old[None, :, :]) ** 2).sum(axis=2))
    if len(old) > 1:
        gaps = np.sqrt(((old[:, None, :] - old[None, :, :]) ** 2).sum(axis=2))
        np.fill_diagonal(gaps, np.inf)
        radius = 0.5 * gaps.min(axis=1)
    else:
        radius = np.full(len(old), np.inf)
    rows, cols = linear_sum_assignment(cost)
    ids: list[int | None] = [None] * k
    matched_old: set[int] = set()
    for r, c in zip(rows, cols, strict=True):
        if cost[r, c] <= radius[c]:
            ids[r] = previous.personas[c].persona_id
            matched_old.add(int(c))
    next_id = max([previous.next_id, *(p.persona_id + 1 for p in previous.personas)])
    out: list[int] = []
    # Fresh ids go to unmatched clusters largest first, so the numbering is deterministic.
    unmatched = sorted((c for c in range(k) if ids[c] is None), key=lambda c: -int((labels == c).sum()))
    for c in unmatched:
        ids[c] = next_id
        next_id += 1
    for maybe in ids:
        assert maybe is not None
        out.append(maybe)
    retired = sorted(p.persona_id for i, p in enumerate(previous.personas) if i not in matched_old)
    return out, retired, next_id


def fit_personas(
    rows: Sequence[Mapping[str, object]],
    k_range: range = range(3, 7),
    seed: int = 0,
    previous: PersonaModel | None = None,
    *,
    now: datetime | None = None,
) -> PersonaModel:
    """Learn personas from visitor feature rows.

    Visitors below MIN_EVENTS are left out of the fit. Each k in `k_range` with at least
    MIN_VISITORS_PER_PERSONA visitors per persona is tried (KMeans, 10 restarts); the k with the lowest
    Davies-Bouldin index wins. With `previous`, persona ids are carried over by matching centres (see `_match_ids`).
    Raises ValueError when there is too little (or too uniform) data for the smallest k.
    """
    if len(k_range) == 0 or min(k_range) < 2:
        raise ValueError("k_range must contain values >= 2")
    if previous is not None and previous.trait_names != list(TRAIT_NAMES):
        # Centres over other traits cannot be compared; ids start afresh (fit without `previous`).
        raise ValueError("previous persona model was fitted on other traits; fit without previous")
    full, _ = behaviour_matrix(rows)
    matrix = full[active_mask(rows)]
    n = matrix.shape[0]
    ks = [k for k in k_range if n >= k * MIN_VISITORS_PER_PERSONA]
    if not ks:
        raise ValueError(
            f"too few active visitors to fit personas: {n} with event_count >= {MIN_EVENTS}, "
            f"need at least {min(k_range) * MIN_VISITORS_PER_PERSONA} for k={min(k_range)}"
        )
    center, scale = _fit_scaler(matrix)
    z = _scale(matrix, _LOG_MASK, center, scale, CLIP)
    distinct = np.unique(z, axis=0).shape[0]
    ks = [k for k in ks if k <= distinct]
    if not ks:
        raise ValueError(f"visitors are too uniform to fit personas: only {distinct} distinct behaviour rows")

    sample = min(n, SILHOUETTE_SAMPLE)
    silhouette_by_k: dict[int, float] = {}
    davies_bouldin_by_k: dict[int, float] = {}
    fits: dict[int, IntArray] = {}
    for k in ks:
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z)
        labels = km.labels_.astype(np.int64)
        if np.unique(labels).size < k:  # KMeans collapsed clusters: this k is not supported by the data
            continue
        silhouette_by_k[k] = float(
            silhouette_score(z, labels, sample_size=sample if sample < n else None, random_state=seed)
        )
        davies_bouldin_by_k[k] = float(davies_bouldin_score(z, labels))
        fits[k] = labels
    if not silhouette_by_k:
        raise ValueError("could not fit any k in k_range: the data has too little structure")
    # Davies-Bouldin (mean ratio of within-persona spread to the distance between personas; lower is better)
    # chose the simulator's five visitor types on the demo shop where silhouette preferred merging two of them.
    best_k = min(davies_bouldin_by_k, key=lambda k: (davies_bouldin_by_k[k], k))  # ties: fewer personas
    labels = fits[best_k]
    # Centres are recomputed from the members rather than taken from KMeans so they match the labels exactly.
    centres = np.vstack([z[labels == c].mean(axis=0) for c in range(best_k)])

    if previous is None:
        by_size = sorted(range(best_k), key=lambda c: (-int((labels == c).sum()), c))
        # Ids start at 1: 0 is what many int columns default to, and must never look like a persona.
        ids = [0] * best_k
        for rank, c in enumerate(by_size):
            ids[c] = rank + 1
        retired: list[int] = []
        next_id = best_k + 1
        version = 1
    else:
        ids, retired, next_id = _match_ids(previous, matrix, labels, best_k)
        version = previous.version + 1

    profiles = _profiles(matrix, z, labels, best_k)
    names = _name_personas(profiles, ids)
    personas: list[Persona] = []
    for c in range(best_k):
        name, name_trait = names[c]
        description_id, description_en, top = _describe(profiles[c], name, name_trait)
        size = int((labels == c).sum())
        personas.append(
            Persona(
                persona_id=ids[c],
                name_id=name[0],
                name_en=name[1],
                description_id=description_id,
                description_en=description_en,
                size=size,
                share=size / n,
                top_traits=top,
            )
        )
    order = sorted(range(best_k), key=lambda c: ids[c])
    return PersonaModel(
        version=version,
        created_at=(now or wall_datetime()).isoformat(),
        k=best_k,
        silhouette_by_k=silhouette_by_k,
        davies_bouldin_by_k=davies_bouldin_by_k,
        trait_names=list(TRAIT_NAMES),
        log_traits=[t.log for t in TRAITS],
        center=[float(v) for v in center],
        scale=[float(v) for v in scale],
        clip=CLIP,
        centres=[[float(v) for v in centres[c]] for c in order],
        personas=[personas[c] for c in order],
        retired_ids=retired,
        next_id=next_id,
        n_fit=n,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------- movement


def movement_report(
    old_model: PersonaModel, new_model: PersonaModel, rows: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    """How the same visitors move between personas from one model to the next.

    Returns {"n", "transitions": {old_id: {new_id: count}}, "stayed", "stayed_share",
    "stayed_share_by_old": {old_id: share}, "retired_ids", "new_ids"}. Ids are strings so the report is JSON.
    """
    matrix, names = behaviour_matrix(rows)
    if old_model.trait_names != names or new_model.trait_names != names:
        raise ValueError("persona models were fitted on other traits; refit them with this code version")
    old_ids = old_model.assign_matrix(matrix)
    new_ids = new_model.assign_matrix(matrix)
    transitions: dict[str, dict[str, int]] = {}
    pairs, counts = np.unique(np.stack([old_ids, new_ids], axis=1), axis=0, return_counts=True)
    for (o, w), count in zip(pairs.tolist(), counts.tolist(), strict=True):
        transitions.setdefault(str(o), {})[str(w)] = int(count)
    n = len(rows)
    stayed_mask = old_ids == new_ids
    stayed_by_old = {str(pid): float(stayed_mask[old_ids == pid].mean()) for pid in np.unique(old_ids).tolist()}
    return {
        "n": n,
        "transitions": transitions,
        "stayed": int(stayed_mask.sum()),
        "stayed_share": float(stayed_mask.mean()) if n else 0.0,
        "stayed_share_by_old": stayed_by_old,
        "retired_ids": sorted(set(old_model.persona_ids) - set(new_model.persona_ids)),
        "new_ids": sorted(set(new_model.persona_ids) - set(old_model.persona_ids)),
    }
