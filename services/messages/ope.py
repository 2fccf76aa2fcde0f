"""Offline evaluation of message policies from logged decisions: IPS, self-normalised IPS and doubly robust.

Every logged decision i has the visitor's context x_i, its eligible actions (send nothing, or one of the
candidate messages), the logged action a_i with its propensity p_i = pi_0(a_i | x_i), and the reward r_i
(`reward.py`: by default 1 if the visitor bought anything within the outcome window after the send time;
or a visit, capped revenue, a mix; minus `send_cost` per message sent). For a deterministic target policy
pi with w_i = 1[a_i = pi(x_i)] / p_i:

    IPS   = mean(w_i r_i)
    SNIPS = sum(w_i r_i) / sum(w_i)
    DR    = mean(r^(x_i, pi(x_i)) + w_i (r_i - r^(x_i, a_i)))

with r^ from the uplift model (baseline b(x) for "nothing", b(x) + uplift for a message) when it predicts the
reward evaluated, else from the arms' means (DR is unbiased either way; a good r^ only narrows it). The estimators
are the shared ones of `services/offline/estimators.py`: normal 95% intervals with a cluster-robust
variance over visitors, the effective sample size (sum w)^2 / sum w^2 and the largest weight. The learned policy is
compared with the best single-message policy on the same decisions (paired DR differences), which is far
tighter than comparing two separate intervals.

Policies: the learned one (the message with the highest expected uplift when it beats the send cost plus
`min_uplift`, else nothing), "send nothing", for every template "always this message when eligible, else
nothing", and any policy given as target actions (a policy file, `policy_file.py`). The learned policy's
predictions come from a stored model or are cross-fitted on the evaluated log itself (`crossfit.py`), which
the report then says. Every policy other than the single messages is compared with each single message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from services.messages.crossfit import Predictions
from services.messages.model import MessageModel
from services.messages.replay import LoggedDecisions
from services.messages.reward import Reward
from services.offline.estimators import Estimate, doubly_robust, ips, snips

LEARNED: Final = "learned"
NOTHING: Final = "send_nothing"


def _interval(estimate: Estimate) -> list[float]:
    return [round(estimate.value, 6), round(estimate.ci_low, 6), round(estimate.ci_high, 6)]


@dataclass(frozen=True)
class PolicyValue:
    policy: str
    description: str
    ips: Estimate
    snips: Estimate
    dr: Estimate
    matched: int  # decisions where the logged action is the policy's action
    send_share: float  # share of decisions where the policy sends a message

    @property
    def ess(self) -> float:
        return self.ips.ess

    @property
    def max_weight(self) -> float:
        return self.ips.max_weight

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "description": self.description,
            "dr": _interval(self.dr),
            "snips": _interval(self.snips),
            "ips": _interval(self.ips),
            "ess": round(self.ess, 1),
            "max_weight": round(self.max_weight, 3),
            "matched": self.matched,
            "send_share": round(self.send_share, 4),
        }


@dataclass(frozen=True)
class Comparison:
    policy: str
    baseline: str
    difference: Estimate  # DR value of `policy` minus DR value of `baseline`, paired per decision

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "baseline": self.baseline, "dr_difference": _interval(self.difference)}


@dataclass
class Evaluation:
    decisions: int
    visitors: int
    window_h: float
    send_cost: float
    logged_value: float
    policies: list[PolicyValue]
    learned_vs_best_single: Comparison | None
    model_version: str | None
    excluded: dict[str, int] = field(default_factory=dict)  # logged decisions left out, by reason
    reward: Reward = field(default_factory=Reward)
    cross_fit_folds: int = 0  # K when the learned policy was cross-fitted on this log over K folds by visitor
    # Each non-single policy (learned, files) against every single message with enough matched decisions.
    comparisons: list[Comparison] = field(default_factory=list)
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)  # what each policy file left out

    def against_singles(self, policy: str) -> list[Comparison]:
        return [c for c in self.comparisons if c.policy == policy]

    def to_json(self) -> dict[str, Any]:
        return {
            "decisions": self.decisions,
            "visitors": self.visitors,
            "window_h": self.window_h,
            "send_cost": self.send_cost,
            "reward": self.reward.describe(),
            "model_version": self.model_version,
            "logged_value": round(self.logged_value, 6),
            "excluded": self.excluded,
            "policies": [p.to_json() for p in rank(self.policies)],
            "learned_vs_best_single": self.learned_vs_best_single.to_json() if self.learned_vs_best_single else None,
            "cross_fit": {"folds": self.cross_fit_folds, "by": "visitor"} if self.cross_fit_folds else None,
            "comparisons": [c.to_json() for c in self.comparisons],
            "policy_files": self.coverage,
        }


def reward_model(
    data: LoggedDecisions, predictions: Predictions | None, outcome: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """r^(x, nothing) per decision and r^(x, message) per candidate row, in the units of `outcome` (default:
    conversion). Predictions are used when given: the caller passes them only when they are in those units."""
    if predictions is not None:
        return predictions.baseline, predictions.baseline[data.cand_owner] + predictions.uplift
    # Without a model the direct method falls back to group means (DR then equals IPS plus a constant shift).
    y = data.converted.astype(np.float64) if outcome is None else outcome
    sent = data.sent()
    nothing_rate = float(y[~sent].mean()) if (~sent).any() else 0.0
    sent_rate = float(y[sent].mean()) if sent.any() else nothing_rate
    return np.full(data.size, nothing_rate), np.full(len(data.cand_owner), sent_rate)


def learned_actions(data: LoggedDecisions, model: MessageModel, min_uplift: float) -> np.ndarray:
    """The greedy policy of the model: the candidate row with the largest uplift if above `min_uplift`, else -1."""
    uplift, _, _ = model.uplift(data.V, data.A, data.cand_owner)
    return greedy_actions(data, uplift, min_uplift)


def greedy_actions(data: LoggedDecisions, scores: np.ndarray, threshold: float) -> np.ndarray:
    actions = np.full(data.size, -1, dtype=np.int64)
    if len(scores) == 0:
        return actions
    # Best candidate per decision: sort by (owner, -score) and keep the first row of every owner.
    order = np.lexsort((-scores, data.cand_owner))
    owners = data.cand_owner[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = owners[1:] != owners[:-1]
    best_rows = order[first]
    keep = scores[best_rows] > threshold
    actions[data.cand_owner[best_rows[keep]]] = best_rows[keep]
    return actions


def single_message_actions(data: LoggedDecisions, template_id: str) -> np.ndarray:
    """Always send `template_id` when it is eligible (its candidate row), else nothing."""
    actions = np.full(data.size, -1, dtype=np.int64)
    rows = np.array([j for j, t in enumerate(data.cand_template) if t == template_id], dtype=np.int64)
    if len(rows):
        actions[data.cand_owner[rows]] = rows
    return actions


@dataclass(frozen=True)
class _Terms:
    """Per decision: importance weight, reward-model value of the target's action and of the logged one."""

    weights: np.ndarray
    q_target: np.ndarray
    q_logged: np.ndarray


def _terms(
    data: LoggedDecisions, target: np.ndarray, r_nothing: np.ndarray, r_candidates: np.ndarray, send_cost: float
) -> _Terms:
    if len(r_candidates) == 0:
        r_candidates = np.zeros(1)  # no candidate rows: every action is "nothing", the row is never read
    matched = target == data.action
    weights = np.where(matched, 1.0 / data.propensity, 0.0)
    q_target = np.where(target >= 0, r_candidates[np.maximum(target, 0)] - send_cost, r_nothing)
    q_logged = np.where(data.action >= 0, r_candidates[np.maximum(data.action, 0)] - send_cost, r_nothing)
    return _Terms(weights, q_target, q_logged)


def evaluate_messages(
    data: LoggedDecisions,
    model: MessageModel | Predictions | None,
    min_uplift: float = 0.001,
    send_cost: float = 0.0,
    template_names: Mapping[str, str] | None = None,
    min_matched: int = 30,
    reward: Reward | None = None,
    targets: Mapping[str, tuple[str, np.ndarray]] | None = None,
) -> Evaluation:
    """Value of the learned policy, "send nothing", every single-message policy and the `targets` (name ->
    (description, candidate row per decision, -1 = nothing)) on the logged decisions.

    `model`: a stored model, or `Predictions` cross-fitted on this log (`crossfit.cross_fit`).
    Intervals are cluster-robust over visitors: one visitor's daily decisions are not independent."""
    if data.size == 0:
        raise ValueError("no logged decisions to evaluate")
    if (data.propensity <= 0).any():
        raise ValueError("every logged decision needs a positive propensity")
    names = template_names or {}
    chosen = reward or Reward()
    outcome = chosen.values(data.converted, data.visited, data.revenue)
    reward_values = outcome - send_cost * data.sent()
    clusters = np.unique(np.array(data.visitor_ids), return_inverse=True)[1]
    predictions = Predictions.of_model(model, data) if isinstance(model, MessageModel) else model
    # The predictions are an outcome model only for the reward they predict (the funnel: conversion).
    same_units = predictions is not None and predictions.reward == chosen
    r_nothing, r_candidates = reward_model(data, predictions if same_units else None, outcome)
    policies: list[PolicyValue] = []
    terms: dict[str, _Terms] = {}

    def add(name: str, description: str, target: np.ndarray) -> None:
        t = _terms(data, target, r_nothing, r_candidates, send_cost)
        terms[name] = t
        policies.append(
            PolicyValue(
                policy=name,
                description=description,
                ips=ips(reward_values, t.weights, clusters),
                snips=snips(reward_values, t.weights, clusters),
                dr=doubly_robust(reward_values, t.weights, t.q_logged, t.q_target, clusters=clusters),
                matched=int((t.weights > 0).sum()),
                send_share=float((target >= 0).mean()),
            )
        )

    if predictions is not None:
        # A message is worth sending when its uplift pays for its cost (both in the reward's units).
        bar = min_uplift + send_cost
        description = f"{predictions.source}: highest expected uplift above {bar:.4g}, else nothing"
        add(LEARNED, description, greedy_actions(data, predictions.uplift, bar))
    add(NOTHING, "never send", np.full(data.size, -1, dtype=np.int64))
    singles: list[str] = []
    for template in sorted(set(data.cand_template)):
        name = f"only:{template}"
        add(
            name,
            f"always {names.get(template, template)} when eligible, else nothing",
            single_message_actions(data, template),
        )
        singles.append(name)
    for name, (description, target) in (targets or {}).items():
        add(name, description, target)

    def compare(policy: str, baseline: str) -> Comparison:
        a, b = terms[policy], terms[baseline]
        # DR is linear in (weight, q_target): the paired difference is a DR estimate with weight a.w - b.w.
        difference = doubly_robust(
            reward_values, a.weights - b.weights, a.q_logged, a.q_target - b.q_target, clusters=clusters
        )
        return Comparison(policy, baseline, difference)

    comparable = [p for p in policies if p.policy in singles and p.matched >= min_matched]
    others = [p.policy for p in policies if p.policy not in singles and p.policy != NOTHING]
    comparisons = [compare(policy, single.policy) for policy in others for single in comparable]
    best_single = max(comparable, key=lambda p: p.dr.value) if comparable else None
    return Evaluation(
        decisions=data.size,
        visitors=int(clusters.max()) + 1 if data.size else 0,
        window_h=data.window_h,
        send_cost=send_cost,
        logged_value=float(reward_values.mean()),
        policies=policies,
        learned_vs_best_single=(
            compare(LEARNED, best_single.policy) if predictions is not None and best_single is not None else None
        ),
        model_version=predictions.source if predictions is not None and not predictions.folds else None,
        excluded=dict(data.excluded),
        reward=chosen,
        cross_fit_folds=predictions.folds if predictions is not None else 0,
        comparisons=comparisons,
    )


def rank(policies: Sequence[PolicyValue]) -> list[PolicyValue]:
    return sorted(policies, key=lambda p: -p.dr.value if not math.isnan(p.dr.value) else math.inf)
