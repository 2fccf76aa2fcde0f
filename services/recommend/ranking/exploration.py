"""Exploration when serving: which items a slot shows, and with what probability each was placed.

A deterministic top-k gives every unshown item probability zero, so its logs cannot say what another
ranking would have earned. A little randomness, with the exact probability of every placement logged,
makes the logs usable for off-policy evaluation (services/offline/policy.py).

Placement is sequential: position 0 is filled first, then position 1 from the items left, and so on.
The logged propensity of an item is the probability that it was chosen *at its position, given the items
already placed* (the sequential choice probability); the probability of a whole slate is the product.

- off: the ranked list as it is (propensity 1).
- epsilon_greedy(ε): per position, the best remaining item with probability 1 − ε, otherwise a uniformly
  random remaining item (which may be the best one): P = (1 − ε)·[best] + ε / remaining.
- softmax(T): Plackett-Luce sampling without replacement over the scores: P = exp(s/T) / Σ_remaining exp(s/T).

The input is the rule-eligible list in ranked order (pinned items first), so exploration never shows an
item the rules refused. Pure code: no I/O, the random generator is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["off", "epsilon_greedy", "softmax"]


class Exploration(BaseModel):
    """Exploration of one slot (by name or kind, see RecommendSettings.exploration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "off"
    epsilon: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    temperature: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0
    # Explore only among the first `top_n` eligible items (None = all of them). A small pool keeps the
    # quality loss bounded; off-policy estimates can only cover rankings that draw from the same pool.
    top_n: Annotated[int, Field(ge=1, le=5000)] | None = None

    @model_validator(mode="after")
    def _parameters_match_mode(self) -> Exploration:
        if self.mode == "epsilon_greedy" and self.epsilon <= 0.0:
            raise ValueError("epsilon_greedy needs epsilon > 0 (use mode 'off' for no exploration)")
        return self

    @property
    def active(self) -> bool:
        return self.mode != "off"


OFF = Exploration()


@dataclass(frozen=True)
class Placement:
    """The chosen rows of the eligible list in slot order, each with its sequential placement probability."""

    order: np.ndarray  # int64 indices into the eligible list
    propensities: np.ndarray  # float64, same length
    pool: int  # how many eligible items the choice was made from (pinned ones included)


def epsilon_greedy_probability(is_greedy: bool, remaining: int, epsilon: float) -> float:
    """P(an item is placed at a position | items already placed) under ε-greedy with `remaining` choices."""
    if remaining <= 0:
        return 0.0
    return (1.0 - epsilon) * float(is_greedy) + epsilon / remaining


def softmax_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """exp((s − max s)/T): relative Plackett-Luce weights, overflow-free. NaN scores get weight 0."""
    logits = np.asarray(scores, dtype=np.float64) / temperature
    finite = np.isfinite(logits)
    if not finite.any():
        return np.ones(len(logits))
    top = logits[finite].max()
    return np.where(finite, np.exp(np.where(finite, logits - top, 0.0)), 0.0)


def sequential_probabilities(
    scores: np.ndarray, chosen: Sequence[int], exploration: Exploration, fixed: int = 0
) -> np.ndarray:
    """The placement probability of each chosen row given the rows placed before it.

    `scores` are those of the eligible list in ranked order; `chosen` the rows in slot order; the first
    `fixed` slots are the pinned rows 0..fixed-1 (placed with probability 1)."""
    n = len(scores)
    pool = n if exploration.top_n is None else min(n, fixed + exploration.top_n)
    remaining = np.zeros(n, dtype=bool)
    remaining[:pool] = True
    weights = softmax_weights(scores[:pool], exploration.temperature) if exploration.mode == "softmax" else None
    out = np.zeros(len(chosen), dtype=np.float64)
    for slot, row in enumerate(chosen):
        if slot < fixed:
            out[slot] = 1.0 if row == slot else 0.0
        elif not 0 <= row < pool or not remaining[row]:
            out[slot] = 0.0  # outside the pool or already placed: this policy could not have placed it
        elif exploration.mode == "off":
            out[slot] = 1.0 if row == int(np.argmax(remaining)) else 0.0
        elif exploration.mode == "epsilon_greedy":
            greedy = int(np.argmax(remaining))  # the first remaining row: the list is in ranked order
            out[slot] = epsilon_greedy_probability(row == greedy, int(remaining.sum()), exploration.epsilon)
        else:
            assert weights is not None
            total = float(weights[remaining[:pool]].sum())
            out[slot] = float(weights[row]) / total if total > 0 else 1.0 / int(remaining.sum())
        if 0 <= row < n:
            remaining[row] = False
    return out


def explore(
    scores: np.ndarray, count: int, exploration: Exploration, rng: np.random.Generator, fixed: int = 0
) -> Placement:
    """Choose `count` rows of the eligible list (ranked order, scores aligned) and their propensities.

    The first `fixed` rows (pinned by the merchandiser) keep their places with probability 1."""
    n = len(scores)
    count = min(count, n)
    fixed = min(fixed, count)
    pool = n if exploration.top_n is None else min(n, fixed + exploration.top_n)
    count = min(count, max(pool, fixed))
    if not exploration.active or count == fixed:
        order = np.arange(count, dtype=np.int64)
        return Placement(order, np.ones(count), pool)
    chosen = list(range(fixed))
    free = list(range(fixed, pool))
    if exploration.mode == "epsilon_greedy":
        for _ in range(count - fixed):
            # `free` stays in ranked order, so its head (0) is the best remaining row.
            pick = int(rng.integers(len(free))) if rng.random() < exploration.epsilon else 0
            chosen.append(free.pop(pick))
    else:
        # Gumbel-top-k: sorting log-weights plus Gumbel noise draws a Plackett-Luce ranking without replacement.
        weights = softmax_weights(scores[fixed:pool], exploration.temperature)
        with np.errstate(divide="ignore"):
            keys = np.log(weights) + rng.gumbel(size=len(weights))
        picked = np.argsort(-keys, kind="stable")[: count - fixed]
        chosen.extend(int(fixed + i) for i in picked)
    order = np.asarray(chosen, dtype=np.int64)
    return Placement(order, sequential_probabilities(scores, chosen, exploration, fixed), pool)


def exploration_for(
    settings: Mapping[str, Exploration] | None, slot_name: str, slot_kind: str, default: Exploration = OFF
) -> Exploration:
    """The most specific configured exploration: by slot name, then slot kind, then "*"."""
    if not settings:
        return default
    for key in (slot_name, slot_kind, "*"):
        found = settings.get(key)
        if found is not None:
            return found
    return default
