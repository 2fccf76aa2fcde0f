"""Assignment: GrowthBook compatibility, stickiness, coverage ramp-up, weights and holdout."""

from __future__ import annotations

import pytest

from services.experiments.assignment import (
    HOLDOUT_ARM,
    Assignment,
    assign,
    bucket_ranges,
    choose_arm,
    equal_weights,
    fnv1a32,
    growthbook_hash,
)

# Source: growthbook/growthbook, packages/sdk-js/test/cases.json ("hash" section, spec 0.5.x+),
# rows are [seed, value, version, expected].
GROWTHBOOK_HASH_CASES: list[tuple[str, str, int, float | None]] = [
    ("", "a", 1, 0.22),
    ("", "b", 1, 0.077),
    ("b", "a", 1, 0.946),
    ("ef", "d", 1, 0.652),
    ("asdf", "8952klfjas09ujk", 1, 0.549),
    ("", "123", 1, 0.011),
    ("", '___)((*":&', 1, 0.563),
    ("seed", "a", 2, 0.0505),
    ("seed", "b", 2, 0.2696),
    ("foo", "ab", 2, 0.2575),
    ("foo", "def", 2, 0.2019),
    ("89123klj", "8952klfjas09ujkasdf", 2, 0.124),
    ("90850943850283058242805", "123", 2, 0.7516),
    ("()**(%$##$%#$#", '___)((*":&', 2, 0.0128),
    ("abc", "def", 99, None),
]

# Same file, "stickyBucket"/"feature" sections: bucket values reported for experiment rules
# (seed = experiment key / explicit seed, hash attribute value, hash version, bucket).
GROWTHBOOK_BUCKET_CASES: list[tuple[str, str, int, float]] = [
    ("feature-exp", "d123", 2, 0.6468),
    ("feature-exp", "i123", 2, 0.9943),
    ("feature", "123", 2, 0.5231),
    ("feature", "123", 1, 0.863),
    ("feature", "456", 1, 0.178),
    ("feature", "fds", 1, 0.514),
]

# Same file, "getBucketRange" section: (name, (num_variations, coverage, weights), expected ranges).
GROWTHBOOK_BUCKET_RANGE_CASES: list[tuple[str, tuple[int, float, list[float] | None], list[tuple[float, float]]]] = [
    ("normal 50/50", (2, 1, None), [(0, 0.5), (0.5, 1)]),
    ("reduced coverage", (2, 0.5, None), [(0, 0.25), (0.5, 0.75)]),
    ("zero coverage", (2, 0, None), [(0, 0), (0.5, 0.5)]),
    ("4 variations", (4, 1, None), [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)]),
    ("uneven weights", (2, 1, [0.4, 0.6]), [(0, 0.4), (0.4, 1)]),
    (
        "uneven weights, reduced coverage, 3 variations",
        (3, 0.2, [0.2, 0.3, 0.5]),
        [(0, 0.04), (0.2, 0.26), (0.5, 0.6)],
    ),
    ("negative coverage", (2, -0.2, None), [(0, 0), (0.5, 0.5)]),
    ("coverage above 1", (2, 1.5, None), [(0, 0.5), (0.5, 1)]),
    ("weights sum below 1", (2, 1, [0.4, 0.1]), [(0, 0.5), (0.5, 1)]),
    ("weights sum above 1", (2, 1, [0.7, 0.6]), [(0, 0.5), (0.5, 1)]),
    (
        "weights.length not equal to num variations",
        (4, 1, [0.4, 0.4, 0.2]),
        [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)],
    ),
    ("weights sum almost equals 1", (2, 1, [0.4, 0.5999]), [(0, 0.4), (0.4, 0.9999)]),
]

# Same file, "chooseVariation" section: (name, n, ranges, expected index).
GROWTHBOOK_CHOOSE_CASES: list[tuple[str, float, list[tuple[float, float]], int]] = [
    ("even range, 0.2", 0.2, [(0, 0.5), (0.5, 1)], 0),
    ("even range, 0.6", 0.6, [(0, 0.5), (0.5, 1)], 1),
    ("even range, 0", 0, [(0, 0.5), (0.5, 1)], 0),
    ("even range, 0.5", 0.5, [(0, 0.5), (0.5, 1)], 1),
    ("reduced range, 0.2", 0.2, [(0, 0.25), (0.5, 0.75)], 0),
    ("reduced range, 0.4", 0.4, [(0, 0.25), (0.5, 0.75)], -1),
    ("reduced range, 0.8", 0.8, [(0, 0.25), (0.5, 0.75)], -1),
    ("reduced range, 0.25", 0.25, [(0, 0.25), (0.5, 0.75)], -1),
    ("reduced range, 0.5", 0.5, [(0, 0.25), (0.5, 0.75)], 1),
    ("zero range", 0.5, [(0, 0.5), (0.5, 0.5), (0.5, 1)], 2),
]

ARMS = ["control", "treatment"]


@pytest.mark.parametrize(("seed", "value", "version", "expected"), GROWTHBOOK_HASH_CASES)
def test_growthbook_hash_vectors(seed: str, value: str, version: int, expected: float | None) -> None:
    assert growthbook_hash(seed, value, version) == expected


@pytest.mark.parametrize(("seed", "value", "version", "expected"), GROWTHBOOK_BUCKET_CASES)
def test_growthbook_experiment_buckets(seed: str, value: str, version: int, expected: float) -> None:
    assert growthbook_hash(seed, value, version) == expected


def test_fnv1a32_reference_values() -> None:
    # Canonical FNV-1a 32-bit test vectors (empty string = offset basis).
    assert fnv1a32("") == 2166136261
    assert fnv1a32("a") == 0xE40C292C
    assert fnv1a32("foobar") == 0xBF9CF968


def test_fnv1a32_hashes_utf16_code_units() -> None:
    # An astral character is two UTF-16 code units in the JS SDK; hash them the same way.
    assert fnv1a32("\U0001f600") == fnv1a32("\ud83d\ude00")
    assert growthbook_hash("seed", "é", 2) is not None


@pytest.mark.parametrize(("name", "args", "expected"), GROWTHBOOK_BUCKET_RANGE_CASES)
def test_growthbook_bucket_ranges(
    name: str, args: tuple[int, float, list[float] | None], expected: list[tuple[float, float]]
) -> None:
    num_variations, coverage, weights = args
    got = bucket_ranges(weights, coverage, num_variations)
    assert len(got) == len(expected), name
    for (g0, g1), (e0, e1) in zip(got, expected, strict=True):
        assert g0 == pytest.approx(e0) and g1 == pytest.approx(e1), name


def test_bucket_ranges_infers_count_from_weights() -> None:
    assert bucket_ranges([0.25, 0.75], 1.0) == [(0.0, 0.25), (0.25, 1.0)]
    assert equal_weights(0) == [] and equal_weights(-1) == []


@pytest.mark.parametrize(("name", "n", "ranges", "expected"), GROWTHBOOK_CHOOSE_CASES)
def test_growthbook_choose_variation(name: str, n: float, ranges: list[tuple[float, float]], expected: int) -> None:
    assert choose_arm(n, ranges) == expected, name


def test_assign_is_sticky_and_matches_growthbook_bucket() -> None:
    first = assign("exp-hero", "visitor-42", ARMS, [0.5, 0.5], 1.0)
    assert first is not None
    for _ in range(5):
        assert assign("exp-hero", "visitor-42", ARMS, [0.5, 0.5], 1.0) == first
    # Seed defaults to the experiment key, so the bucket is GrowthBook's v2 hash of (key, id).
    assert first.hash_value == growthbook_hash("exp-hero", "visitor-42", 2)
    assert first.in_experiment and first.bucket_version == 1
    explicit = assign("exp-hero", "visitor-42", ARMS, [0.5, 0.5], 1.0, seed="exp-hero")
    assert explicit == first


def test_bucket_version_rerandomises() -> None:
    ids = [f"v{i}" for i in range(2000)]
    v1 = [assign("exp", i, ARMS, None, 1.0, bucket_version=1) for i in ids]
    v2 = [assign("exp", i, ARMS, None, 1.0, bucket_version=2) for i in ids]
    assert all(a is not None and a.bucket_version == 1 for a in v1)
    assert all(a is not None and a.bucket_version == 2 for a in v2)
    same = sum(a is not None and b is not None and a.arm == b.arm for a, b in zip(v1, v2, strict=True))
    # Independent re-randomisation keeps about half the visitors in the same arm, not all of them.
    assert 0.45 < same / len(ids) < 0.55, f"share in same arm after version bump: {same / len(ids):.3f}"


def test_raising_coverage_keeps_included_visitors_in_their_arm() -> None:
    ids = [f"visitor-{i}" for i in range(20_000)]
    low = {i: assign("exp-cov", i, ARMS, [0.5, 0.5], 0.2) for i in ids}
    high = {i: assign("exp-cov", i, ARMS, [0.5, 0.5], 0.6) for i in ids}
    included_low = {i: a for i, a in low.items() if a is not None}
    included_high = {i: a for i, a in high.items() if a is not None}
    assert 0.18 < len(included_low) / len(ids) < 0.22
    assert 0.58 < len(included_high) / len(ids) < 0.62
    for visitor, a in included_low.items():
        b = included_high.get(visitor)
        assert b is not None and b.arm == a.arm, visitor


def test_weights_are_respected_on_100k_ids() -> None:
    ids = [f"id-{i}" for i in range(100_000)]
    arms = ["a", "b", "c"]
    weights = [0.2, 0.3, 0.5]
    counts = dict.fromkeys(arms, 0)
    for visitor in ids:
        a = assign("exp-weights", visitor, arms, weights, 1.0)
        assert a is not None
        counts[a.arm] += 1
    for arm, w in zip(arms, weights, strict=True):
        share = counts[arm] / len(ids)
        assert abs(share - w) <= 0.015, f"arm {arm}: share {share:.4f} vs weight {w}"


def test_global_holdout_share_and_consistency() -> None:
    ids = [f"h-{i}" for i in range(40_000)]
    held: list[str] = []
    arm_counts = dict.fromkeys(ARMS, 0)
    for visitor in ids:
        a = assign("exp-a", visitor, ARMS, None, 1.0, holdout=0.05)
        assert a is not None
        if a.arm == HOLDOUT_ARM:
            assert not a.in_experiment
            held.append(visitor)
        else:
            assert a.in_experiment
            arm_counts[a.arm] += 1
    share = len(held) / len(ids)
    assert abs(share - 0.05) <= 0.005, f"holdout share {share:.4f}"
    # The holdout is global: the same visitors are held out of a different experiment too.
    for visitor in held[:500]:
        other = assign("exp-b", visitor, ["x", "y", "z"], None, 0.1, holdout=0.05)
        assert other is not None and other.arm == HOLDOUT_ARM
    # And the remaining visitors are still split evenly between the arms.
    in_exp = sum(arm_counts.values())
    assert abs(arm_counts["control"] / in_exp - 0.5) <= 0.015, arm_counts


def test_assign_degenerate_inputs() -> None:
    assert assign("exp", "", ARMS, None, 1.0) is None
    assert assign("exp", "v1", [], None, 1.0) is None
    assert assign("exp", "v1", ARMS, None, 0.0) is None
    assert assign("exp", "v1", ARMS, None, -3.0) is None
    # Bad weights fall back to equal weights, as in GrowthBook, instead of raising.
    a = assign("exp", "v1", ARMS, [0.9], 1.0)
    assert isinstance(a, Assignment) and a.arm in ARMS
    held = assign("exp", "v1", ARMS, None, 1.0, holdout=1.0)
    assert held is not None and held.arm == HOLDOUT_ARM
