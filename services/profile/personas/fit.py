"""Fitting personas: k by the Davies-Bouldin index, names and descriptions from what sets each apart, ids kept
stable across refreshes (matched to the previous model)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import davies_bouldin_score, silhouette_score

from services.common.clock import wall_datetime
from services.profile.personas.model import Persona, PersonaModel
from services.profile.personas.traits import (
    CLIP,
    EPS,
    FALLBACK_NAMES,
    LOG_MASK,
    MIN_EVENTS,
    MIN_VISITORS_PER_PERSONA,
    NOTABLE_RATIO,
    RATIO_CAP,
    SILHOUETTE_SAMPLE,
    TOP_TRAITS,
    TRAIT_NAMES,
    TRAITS,
    FloatArray,
    IntArray,
    TopTrait,
    Trait,
    active_mask,
    behaviour_matrix,
    standardize,
)

# --------------------------------------------------------------------------------------------- fitting


def _fit_scaler(matrix: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Mean / standard deviation per trait, on log1p values for heavy-tailed traits.

    Whales and bots cannot pull a centre far: scaled values are clipped at ±CLIP. (A median/IQR scaler was
    tried first: on the demo shop it blew zero-inflated traits up and split one visitor type on them while
    merging two others; ARI against the simulator's types fell from 0.94 to 0.69.)
    """
    x = matrix.copy()
    x[:, LOG_MASK] = np.log1p(x[:, LOG_MASK])
    center = np.zeros(x.shape[1])
    scale = np.ones(x.shape[1])
    for j in range(x.shape[1]):
        col = x[:, j][~np.isnan(x[:, j])]
        if col.size == 0:
            continue
        center[j] = float(col.mean())
        std = float(col.std())
        if std > EPS:
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
    r = ratio if high else (1.0 / ratio if ratio > EPS else math.inf)
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
    if population <= EPS:
        return 1.0 if value <= EPS else RATIO_CAP
    # Capped so the model's JSON stays standard (no Infinity) when the population almost never shows a trait.
    return min(value / population, RATIO_CAP)


def _profiles(matrix: FloatArray, z_space: FloatArray, labels: IntArray, k: int) -> list[_Profile]:
    pop_mean = z_space.mean(axis=0)
    pop_std = np.maximum(z_space.std(axis=0), EPS)
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
    fallback = iter(FALLBACK_NAMES)
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
    z = standardize(matrix, LOG_MASK, center, scale, CLIP)
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
