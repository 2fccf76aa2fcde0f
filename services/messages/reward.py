"""What a message decision is worth: the reward that direct uplift learning (`train.py`) and offline evaluation
(`ope.py`) use, chosen in settings (`RECOMMEND_MESSAGES_REWARD`, ...) or on the CLI (`--reward`).

Outcomes are measured within the outcome window after the send time (or the would-be send time of a decision
that sent nothing), from the visitor's own events, so no opens or clicks are needed:

    conversion  1 if the visitor bought anything
    visit       1 if the visitor came to the shop (any behaviour event)
    revenue     what the visitor spent, capped at `revenue_cap` (one huge order must not decide a policy)
    mix         conversion_weight * conversion + visit_weight * visit + revenue_weight * capped revenue

A send cost (fatigue, the price of a WhatsApp message), in the reward's own units, is subtracted per message
sent by `ope.evaluate_messages` and is the bar a message's predicted uplift must pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import numpy as np

RewardKind = Literal["conversion", "visit", "revenue", "mix"]
REWARD_KINDS: Final = ("conversion", "visit", "revenue", "mix")


@dataclass(frozen=True)
class Reward:
    kind: RewardKind = "conversion"
    revenue_cap: float = math.inf
    conversion_weight: float = 1.0
    visit_weight: float = 0.0
    revenue_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"reward must be one of {', '.join(REWARD_KINDS)}, got {self.kind!r}")
        if not self.revenue_cap > 0:
            raise ValueError("the revenue cap must be positive")

    @property
    def binary(self) -> bool:
        """Whether every outcome is 0 or 1 (a classifier learns it; otherwise a regression)."""
        return self.kind in ("conversion", "visit")

    def values(self, converted: np.ndarray, visited: np.ndarray, revenue: np.ndarray) -> np.ndarray:
        """The reward of each decision from its outcomes (before any send cost)."""
        n = len(converted)
        weights = {
            "conversion": (1.0, 0.0, 0.0),
            "visit": (0.0, 1.0, 0.0),
            "revenue": (0.0, 0.0, 1.0),
            "mix": (self.conversion_weight, self.visit_weight, self.revenue_weight),
        }[self.kind]
        total = np.zeros(n)
        for weight, outcome, name in zip(
            weights, (converted, visited, revenue), ("conversion", "visit", "revenue"), strict=True
        ):
            if weight == 0:
                continue
            if len(outcome) != n:
                raise ValueError(f"this log does not record the {name} outcomes a {self.kind} reward needs")
            values = outcome.astype(np.float64)
            total += weight * (np.minimum(values, self.revenue_cap) if name == "revenue" else values)
        return total

    def describe(self) -> str:
        cap = "" if math.isinf(self.revenue_cap) else f" capped at {self.revenue_cap:,.0f}"
        if self.kind == "mix":
            return (
                f"{self.conversion_weight:g} x conversion + {self.visit_weight:g} x visit + "
                f"{self.revenue_weight:g} x revenue{cap}"
            )
        return f"revenue{cap}" if self.kind == "revenue" else self.kind

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["revenue_cap"] = None if math.isinf(self.revenue_cap) else self.revenue_cap
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Reward:
        if not data:
            return cls()
        values = dict(data)
        values["revenue_cap"] = math.inf if values.get("revenue_cap") is None else float(values["revenue_cap"])
        return cls(**values)
