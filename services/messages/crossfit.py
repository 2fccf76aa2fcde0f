"""The learned policy's predictions for every logged decision, from a stored model or cross-fitted on the log.

Evaluating a model on the decisions it was trained on flatters it: it has seen their outcomes, so its greedy
policy and its outcome model (the direct part of DR) both fit the noise of exactly the rewards they are
scored on. Cross-fitting removes that: the visitors of the log are split into K folds at random, a model is
trained on the other K-1 folds for each fold, and each decision is scored by the model that never saw it
(nor any other decision of the same visitor, since a visitor's decisions share their noise). The K held-out
predictions are pooled, so every decision counts once and the estimators and their intervals are used as
usual; what is estimated is the value of "this learner trained on (K-1)/K of such a log".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.messages.model import MessageModel
from services.messages.replay import LoggedDecisions
from services.messages.reward import Reward
from services.messages.train import MessageTrainConfig, train_message_model

MIN_FOLDS = 2


@dataclass(frozen=True)
class Predictions:
    """Per candidate row: predicted uplift; per decision: predicted reward of sending nothing (baseline)."""

    uplift: np.ndarray
    baseline: np.ndarray
    reward: Reward  # the units of both (the funnel learner: conversion)
    source: str  # the model version, or how it was cross-fitted
    folds: int = 0  # 0: one model trained elsewhere; K: cross-fitted over K folds by visitor

    @classmethod
    def of_model(cls, model: MessageModel, data: LoggedDecisions) -> Predictions:
        uplift, _, baseline = model.uplift(data.V, data.A, data.cand_owner)
        return cls(uplift, baseline, model.reward, model.version)


def visitor_folds(visitor_ids: list[str], folds: int, seed: int) -> np.ndarray:
    """A fold number per decision: visitors assigned to folds at random, every decision of a visitor together."""
    _, inverse = np.unique(np.array(visitor_ids), return_inverse=True)
    visitors = int(inverse.max()) + 1 if len(inverse) else 0
    assignment = np.random.default_rng([seed, 17]).permutation(visitors) % folds
    folded: np.ndarray = assignment[inverse]
    return folded


def cross_fit(data: LoggedDecisions, config: MessageTrainConfig, folds: int = 5) -> Predictions:
    """Train one model per fold on the other folds and predict the held-out fold with it; raises ValueError
    when the log has too few visitors or a fold's training part has nothing to learn from."""
    if folds < MIN_FOLDS:
        raise ValueError(f"cross-fitting needs at least {MIN_FOLDS} folds, got {folds}")
    if len(set(data.visitor_ids)) < folds:
        raise ValueError(f"cross-fitting over {folds} folds needs at least {folds} visitors")
    fold = visitor_folds(data.visitor_ids, folds, config.seed)
    uplift = np.zeros(len(data.cand_owner))
    baseline = np.zeros(data.size)
    reward = config.reward
    for k in range(folds):
        held = fold == k
        try:
            model = train_message_model(data.subset(~held), config).model
        except ValueError as exc:
            raise ValueError(f"fold {k + 1} of {folds}: {exc}") from exc
        reward = model.reward  # the funnel learner predicts conversion whatever reward was asked for
        part = data.subset(held)
        fold_uplift, _, fold_baseline = model.uplift(part.V, part.A, part.cand_owner)
        baseline[held] = fold_baseline
        # `subset` keeps the candidate rows of the kept decisions in their order.
        uplift[held[data.cand_owner]] = fold_uplift
    source = f"{config.learner} learner cross-fitted over {folds} folds by visitor"
    return Predictions(uplift, baseline, reward, source, folds)
