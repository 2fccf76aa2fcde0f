"""The policy of one decision: send nothing or one of the eligible messages, with the probability each action
had (the propensity offline evaluation divides by).

Personalized: the message with the highest expected uplift when it beats `min_uplift`, else nothing, with
epsilon-greedy exploration over all actions (uniform while there is no model). Rules baseline (experiment
arms that are not personalized): the most time-sensitive trigger, no exploration. A random control group,
drawn before the policy, gets nothing and measures what messages add.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from services.messages.settings import MessageSettings

# The rules baseline: the most time-sensitive trigger first.
RULE_PRIORITY: Final = {
    trigger: rank
    for rank, trigger in enumerate(
        (
            "cart_abandonment",
            "back_in_stock",
            "price_drop",
            "payday_promo",
            "new_arrivals",
            "loyalty_reward",
            "win_back",
        )
    )
}


def uniforms(salt: str, visitor_id: str, channel: str, day: str) -> tuple[float, float]:
    """Two reproducible uniforms per (visitor, channel, local day): asking again the same day answers the same."""
    digest = hashlib.blake2b(f"{salt}\x1f{visitor_id}\x1f{channel}\x1f{day}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:], "big") / 2**64


@dataclass(frozen=True, slots=True)
class Choice:
    action: int  # 0 = send nothing, j = the j-th candidate (1-based)
    greedy: int  # the action the policy prefers without exploration
    propensity: float  # P(action) under the logging policy, control group included
    control: bool  # drawn into the random control group
    reason: str  # why nothing is sent ("control_group", "no_expected_uplift", "exploration"); "" for a send


def choose(
    scores: Sequence[float],
    triggers: Sequence[str],
    personalized: bool,
    has_model: bool,
    settings: MessageSettings,
    draws: tuple[float, float],
) -> Choice:
    """The action for one decision with k = len(scores) candidates. `scores`: each candidate's expected uplift
    (zeros without a model); `triggers`: each candidate's trigger; `draws`: `uniforms(...)` of the decision."""
    s = settings
    k = len(scores)
    if personalized:
        best = max(range(k), key=scores.__getitem__)
        greedy = best + 1 if not has_model or scores[best] > s.min_uplift else 0  # 0 = send nothing
        epsilon = s.cold_start_exploration if not has_model else s.exploration
    else:  # rules baseline of an experiment: the most urgent trigger, no model, no exploration
        greedy = 1 + min(range(k), key=lambda j: RULE_PRIORITY[triggers[j]])
        epsilon = 0.0
    # Action 0 is "send nothing", 1..k the candidates; the random control group comes on top.
    probabilities = [epsilon / (k + 1)] * (k + 1)
    probabilities[greedy] += 1.0 - epsilon
    u_control, u_action = draws
    control = u_control < s.control_rate
    reason = ""
    if control:
        action, reason = 0, "control_group"
    else:
        action, mass = k, 0.0
        for a, probability in enumerate(probabilities):
            mass += probability
            if u_action < mass:
                action = a
                break
        if action == 0:
            reason = "no_expected_uplift" if greedy == 0 and has_model else "exploration"
    # What the logging policy gave this action, control group included (offline evaluation divides by it).
    propensity = (1.0 - s.control_rate) * probabilities[action] + (s.control_rate if action == 0 else 0.0)
    return Choice(action, greedy, propensity, control, reason)
