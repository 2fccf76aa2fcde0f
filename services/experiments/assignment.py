"""Deterministic, GrowthBook-compatible experiment assignment.

The unit of randomization is the visitor. Hashing is pure and stateless, so the same visitor
always lands in the same arm (stickiness) for a given seed and bucket version, and the browser-side
GrowthBook SDK would compute the same bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FNV_OFFSET_BASIS = 2166136261
FNV_PRIME = 16777619
HOLDOUT_ARM = "holdout"
DEFAULT_HOLDOUT_SEED = "selaras-holdout"


def _utf16_code_units(text: str) -> list[int]:
    # The JS SDK hashes `charCodeAt` values (UTF-16 code units); astral characters therefore
    # contribute two surrogate units. Doing the same keeps non-BMP ids identical to the browser.
    units: list[int] = []
    for ch in text:
        cp = ord(ch)
        if cp > 0xFFFF:
            cp -= 0x10000
            units.append(0xD800 + (cp >> 10))
            units.append(0xDC00 + (cp & 0x3FF))
        else:
            units.append(cp)
    return units


def fnv1a32(text: str) -> int:
    """32-bit FNV-1a over UTF-16 code units (GrowthBook's `fnv1a32`)."""
    hval = FNV_OFFSET_BASIS
    for unit in _utf16_code_units(text):
        hval ^= unit
        hval = (hval * FNV_PRIME) & 0xFFFFFFFF
    return hval


def growthbook_hash(seed: str, value: str, version: int = 2) -> float | None:
    """GrowthBook bucket hash in [0, 1); None for an unknown hash version."""
    if version == 2:
        # v2 re-hashes the decimal string of the first hash to fix v1's poor mixing across seeds.
        return (fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000
    if version == 1:
        return (fnv1a32(value + seed) % 1000) / 1000
    return None


def equal_weights(num_variations: int) -> list[float]:
    """GrowthBook's getEqualWeights: n equal weights, [] for n <= 0."""
    if num_variations <= 0:
        return []
    return [1.0 / num_variations] * num_variations


def bucket_ranges(
    weights: Sequence[float] | None,
    coverage: float = 1.0,
    num_variations: int | None = None,
) -> list[tuple[float, float]]:
    """GrowthBook's getBucketRanges: arm i gets [start_i, start_i + coverage * w_i).

    Coverage is clamped to [0, 1]. Weights that do not match the number of variations or do not sum
    to 1 (within 0.99..1.01) fall back to equal weights, exactly like the SDK. Because every arm's
    range starts at the same point whatever the coverage, raising coverage only adds visitors.
    """
    n = len(weights) if num_variations is None and weights is not None else (num_variations or 0)
    coverage = min(max(coverage, 0.0), 1.0)
    equal = equal_weights(n)
    w = list(weights) if weights is not None else equal
    if len(w) != n:
        w = equal
    total = sum(w)
    if total < 0.99 or total > 1.01:
        w = equal
    ranges: list[tuple[float, float]] = []
    cumulative = 0.0
    for weight in w:
        start = cumulative
        cumulative += weight
        ranges.append((start, start + coverage * weight))
    return ranges


def choose_arm(n: float, ranges: Sequence[tuple[float, float]]) -> int:
    """Index of the half-open range containing n, or -1 when n is outside all of them."""
    for i, (start, end) in enumerate(ranges):
        if start <= n < end:
            return i
    return -1


@dataclass(frozen=True)
class Assignment:
    """Outcome for one visitor; arm is HOLDOUT_ARM (and in_experiment False) for the global holdout."""

    experiment_key: str
    arm: str
    in_experiment: bool
    hash_value: float
    bucket_version: int


def assign(
    experiment_key: str,
    visitor_id: str,
    arm_names: Sequence[str],
    weights: Sequence[float] | None,
    coverage: float,
    seed: str | None = None,
    holdout: float = 0.0,
    holdout_seed: str = DEFAULT_HOLDOUT_SEED,
    bucket_version: int = 1,
) -> Assignment | None:
    """Assign a visitor to an arm.

    Returns None when the visitor is not enrolled (empty id, no arms, outside coverage): the caller
    serves the default experience and logs no exposure. Visitors in the global holdout get the
    pseudo-arm "holdout": generic experience, never personalised, not counted in the experiment.
    """
    if not visitor_id or not arm_names:
        return None
    # The holdout hashes over its own seed (not the experiment's), so the same visitors are held
    # out of every experiment and the holdout is independent of arm assignment.
    holdout = min(max(holdout, 0.0), 1.0)
    if holdout > 0.0:
        h = growthbook_hash(holdout_seed, visitor_id, 2)
        if h is not None and h < holdout:
            return Assignment(experiment_key, HOLDOUT_ARM, False, h, bucket_version)
    base_seed = seed or experiment_key
    # Bumping the bucket version must re-randomise everyone (e.g. after a broken launch); folding it
    # into the seed does that while version 1 stays byte-identical to a plain GrowthBook experiment.
    hash_seed = f"{base_seed}__{bucket_version}" if bucket_version > 1 else base_seed
    n = growthbook_hash(hash_seed, visitor_id, 2)
    if n is None:
        return None
    idx = choose_arm(n, bucket_ranges(weights, coverage, len(arm_names)))
    if idx < 0:
        return None
    return Assignment(experiment_key, arm_names[idx], True, n, bucket_version)


def in_namespace(visitor_id: str, namespace: str, namespace_range: tuple[float, float]) -> bool:
    """GrowthBook's inNamespace: the visitor's hash v1 over the seed "__<namespace>" falls in [start, end).

    The namespace hash uses its own seed, independent of every experiment's arm hash, so the visitors of one
    range are split between that experiment's arms by the experiment's weights."""
    if not visitor_id:
        return False
    n = growthbook_hash(f"__{namespace}", visitor_id, 1)
    return n is not None and namespace_range[0] <= n < namespace_range[1]
