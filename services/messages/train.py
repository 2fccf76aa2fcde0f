"""Training of the uplift model on logged decisions: one LightGBM classifier per funnel stage (or a constant
rate when data is thin), or the direct T-learner on a chosen reward (`learner="uplift"`, see model.py),
validated on the latest decisions, and a check of the predicted uplift against the control group."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np

from services.common.clock import wall_datetime, wall_time
from services.messages.model import MessageModel, Stage, categorical_columns, model_features, visitor_columns
from services.messages.replay import LoggedDecisions
from services.messages.reward import Reward


@dataclass(frozen=True)
class MessageTrainConfig:
    window_h: float = 24.0
    validation_fraction: float = 0.25
    num_boost_round: int = 300
    early_stopping_rounds: int = 30
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 30
    min_rows: int = 60  # fewer rows (or fewer than 5 of each class) -> a constant rate for the stage
    seed: int = 7
    threads: int = 2
    learner: str = "funnel"  # or "uplift": no opens or clicks needed
    reward: Reward = field(default_factory=Reward)  # the uplift learner's target (the funnel: purchases)


@dataclass
class MessageTrainResult:
    model: MessageModel
    metrics: dict[str, Any]


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    if len(y) == 0 or y.all() or not y.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def _fit_stage(
    X: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    names: Sequence[str],
    categoricals: Sequence[str],
    config: MessageTrainConfig,
    weights: np.ndarray | None = None,
    binary: bool = True,
) -> tuple[Stage, dict[str, Any]]:
    """Time split: the latest `validation_fraction` of rows stops boosting early and reports the AUC (or, for a
    regression, the validation RMSE). `weights`: per-row sample weights (the constant is their weighted mean)."""
    n, positives = len(y), int((y > 0).sum())
    w = np.ones(n) if weights is None else weights
    rate = float(np.average(y, weights=w)) if n else 0.0
    info: dict[str, Any] = {"rows": n, "positives": positives, "rate": round(rate, 5)}
    if n < config.min_rows or positives < 5 or (binary and n - positives < 5):
        info["kind"] = "constant"
        return Stage(None, rate), info
    ranked = X[order], y[order], w[order]
    cut = int(n * (1 - config.validation_fraction))
    X_train, y_train, X_valid, y_valid = ranked[0][:cut], ranked[1][:cut], ranked[0][cut:], ranked[1][cut:]
    w_train, w_valid = ranked[2][:cut], ranked[2][cut:]
    categorical = [c for c in categoricals if c in names]
    params = {
        "objective": "binary" if binary else "regression",
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": config.min_data_in_leaf,
        "min_data_per_group": 20,
        "cat_smooth": 20.0,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "seed": config.seed,
        "num_threads": config.threads,
        "verbose": -1,
        "deterministic": True,
    }
    train_set = lgb.Dataset(
        X_train,
        y_train.astype(float),
        weight=w_train,
        feature_name=list(names),
        categorical_feature=categorical,
        params={"verbose": -1},  # trait category codes start at 1: LightGBM's notice about it is not a problem
    )
    has_valid = bool(len(y_valid) and y_valid.any() and (not binary or not y_valid.all()))
    if has_valid:
        valid_set = lgb.Dataset(
            X_valid, y_valid.astype(float), weight=w_valid, reference=train_set, params={"verbose": -1}
        )
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=config.num_boost_round,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)],
        )
        predicted = np.asarray(booster.predict(X_valid, num_iteration=booster.best_iteration))
        if binary:
            auc = _auc(y_valid, predicted)
            info["valid_auc"] = round(auc, 4) if auc is not None else None
        else:
            info["valid_rmse"] = round(float(np.sqrt(np.average((predicted - y_valid) ** 2, weights=w_valid))), 5)
    else:
        booster = lgb.train(params, train_set, num_boost_round=min(100, config.num_boost_round))
    info["kind"] = "lightgbm"
    info["trees"] = booster.num_trees()
    # Keep only the trees early stopping chose, so serving predicts with the validated model.
    best = booster.best_iteration or booster.current_iteration()
    booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    return Stage(booster, rate), info


def train_message_model(data: LoggedDecisions, config: MessageTrainConfig | None = None) -> MessageTrainResult:
    """Fit the four stages on logged decisions; raises ValueError when there is nothing to learn from."""
    config = config or MessageTrainConfig()
    if data.size == 0:
        raise ValueError("no logged message decisions (message_sent events with properties.propensity)")
    sent = data.sent()
    if not sent.any():
        raise ValueError("no message was sent in the logged decisions")
    if config.learner == "uplift":
        return _train_uplift(data, config)
    if config.learner != "funnel":
        raise ValueError(f"learner must be funnel or uplift, got {config.learner!r}")
    started = time.perf_counter()
    features, visitor, categoricals = (
        model_features(data.traits),
        visitor_columns(data.traits),
        categorical_columns(data.traits),
    )
    rows = data.action[sent]
    owners = np.flatnonzero(sent)
    X = np.hstack([data.V[owners], data.A[rows]])
    order = np.argsort(data.send_at[owners], kind="stable")
    stages: dict[str, Stage] = {}
    metrics: dict[str, Any] = {
        "decisions": data.size,
        "sent": int(sent.sum()),
        "control": int(data.control.sum()),
        "traits": [t.name for t in data.traits.traits],
    }
    opened = data.opened[owners]
    clicked = data.clicked[owners]
    stages["open"], metrics["open"] = _fit_stage(X, opened, order, features, categoricals, config)
    mask = opened
    stages["click"], metrics["click"] = _fit_stage(
        X[mask],
        clicked[mask],
        np.argsort(data.send_at[owners][mask], kind="stable"),
        features,
        categoricals,
        config,
    )
    mask = clicked
    stages["purchase"], metrics["purchase"] = _fit_stage(
        X[mask],
        data.attributed[owners][mask],
        np.argsort(data.send_at[owners][mask], kind="stable"),
        features,
        categoricals,
        config,
    )
    unsent = ~sent
    stages["baseline"], metrics["baseline"] = _fit_stage(
        data.V[unsent],
        data.converted[unsent],
        np.argsort(data.send_at[unsent], kind="stable"),
        visitor,
        categoricals,
        config,
    )
    version = f"msg-{wall_datetime().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    model = MessageModel(version, wall_time(), stages, data.window_h, traits=data.traits)
    metrics.update(uplift_check(model, data))
    metrics["trained_on"] = trained_on(data)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    model.metrics = metrics
    return MessageTrainResult(model, metrics)


def _train_uplift(data: LoggedDecisions, config: MessageTrainConfig) -> MessageTrainResult:
    """The T-learner: mu_sent on the sends (decision + message columns), mu_nothing on the decisions that sent
    nothing (decision columns), both on the chosen reward and weighted by 1 / logged propensity."""
    started = time.perf_counter()
    if data.control.sum() + (~data.sent()).sum() == 0:
        raise ValueError("no decision sent nothing: the uplift learner needs the control group")
    y = config.reward.values(data.converted, data.visited, data.revenue)
    weights = 1.0 / data.propensity
    features, visitor, categoricals = (
        model_features(data.traits),
        visitor_columns(data.traits),
        categorical_columns(data.traits),
    )
    sent = data.sent()
    owners = np.flatnonzero(sent)
    X = np.hstack([data.V[owners], data.A[data.action[owners]]])
    binary = config.reward.binary
    stages: dict[str, Stage] = {}
    metrics: dict[str, Any] = {
        "learner": "uplift",
        "reward": config.reward.describe(),
        "decisions": data.size,
        "sent": int(sent.sum()),
        "control": int(data.control.sum()),
        "traits": [t.name for t in data.traits.traits],
    }
    stages["treated"], metrics["treated"] = _fit_stage(
        X,
        y[owners],
        np.argsort(data.send_at[owners], kind="stable"),
        features,
        categoricals,
        config,
        weights[owners],
        binary,
    )
    unsent = ~sent
    stages["baseline"], metrics["baseline"] = _fit_stage(
        data.V[unsent],
        y[unsent],
        np.argsort(data.send_at[unsent], kind="stable"),
        visitor,
        categoricals,
        config,
        weights[unsent],
        binary,
    )
    version = f"msg-{wall_datetime().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    model = MessageModel(
        version, wall_time(), stages, data.window_h, traits=data.traits, learner="uplift", reward=config.reward
    )
    metrics.update(uplift_check(model, data))
    metrics["trained_on"] = trained_on(data)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    model.metrics = metrics
    return MessageTrainResult(model, metrics)


def trained_on(data: LoggedDecisions) -> dict[str, float]:
    """The send times the model learned from: evaluation warns when it is scored on the same period."""
    return {"first_send_at": float(data.send_at.min()), "last_send_at": float(data.send_at.max())}


def uplift_check(model: MessageModel, data: LoggedDecisions) -> dict[str, Any]:
    """The model's mean predicted uplift of the logged sends next to the incremental conversion measured
    against the random control group (non-control sends vs control, same eligibility population)."""
    sent = data.sent()
    if not sent.any():
        return {}
    owners = np.flatnonzero(sent)
    uplift, _, _ = model.uplift(data.V[owners], data.A[data.action[owners]], np.arange(len(owners)))
    out: dict[str, Any] = {"predicted_uplift": round(float(uplift.mean()), 5)}
    control = data.control
    treated = sent & ~control
    if control.sum() >= 20 and treated.any():
        outcome = model.reward.values(data.converted, data.visited, data.revenue)
        treated_rate = float(outcome[treated].mean())
        control_rate = float(outcome[control].mean())
        se = math.sqrt(
            float(outcome[treated].var()) / max(int(treated.sum()), 1)
            + float(outcome[control].var()) / int(control.sum())
        )
        out["measured_uplift"] = round(treated_rate - control_rate, 5)
        out["measured_uplift_ci95"] = [
            round(treated_rate - control_rate - 1.96 * se, 5),
            round(treated_rate - control_rate + 1.96 * se, 5),
        ]
    return out
