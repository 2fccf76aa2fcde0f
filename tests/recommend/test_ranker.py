"""The model runtime: compatibility checks and native compilation that must not change a single score."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from services.common.storage import Namespace
from services.features import schema as F
from services.recommend.ranking.item_embeddings import ItemEmbeddings
from services.recommend.ranking.ranker import IncompatibleModel, ModelMeta, RankerModel
from services.recommend.repository import RecommendRepository
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings


def tiny_booster(names: list[str]) -> bytes:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, len(names)))
    X[rng.random(X.shape) < 0.1] = np.nan  # missing values take LightGBM's default branches
    X[:, names.index("i_category_code")] = rng.integers(0, 30, size=len(X))
    y = (X[:, 0] + rng.normal(size=len(X)) > 1).astype(float)
    params = {"objective": "lambdarank", "num_leaves": 15, "verbosity": -1, "num_threads": 1, "min_data_in_leaf": 20}
    data = lgb.Dataset(X, label=y, group=[50] * 60, feature_name=names, categorical_feature=["i_category_code"])
    return lgb.train(params, data, num_boost_round=40).model_to_string().encode()


def meta(version: str = "v1") -> ModelMeta:
    return ModelMeta(version, 0.0, F.RANKER_FEATURES, F.FEATURE_SERVICE)


def test_native_compilation_gives_lightgbms_scores(tmp_path: Path) -> None:
    text = tiny_booster(list(F.RANKER_FEATURES))
    native = RankerModel.from_bytes(text, meta(), compile_dir=tmp_path)
    plain = RankerModel.from_bytes(text, meta())
    assert native._native is not None, "lleaves should compile the model"
    X = np.random.default_rng(4).normal(size=(500, len(F.RANKER_FEATURES)))
    X[::7, 5] = np.nan
    X[:, F.RANKER_FEATURES.index("i_category_code")] = np.arange(500) % 40  # includes unseen categories
    np.testing.assert_allclose(native.predict(X), plain.predict(X), rtol=0, atol=1e-9)
    np.testing.assert_allclose(plain.predict(X), lgb.Booster(model_str=text.decode()).predict(X), atol=1e-12)
    again = RankerModel.from_bytes(text, meta(), compile_dir=tmp_path)  # a second worker reuses the library
    assert len(list(tmp_path.glob("*.so"))) == 1
    np.testing.assert_allclose(again.predict(X), native.predict(X), atol=0)


def test_a_model_over_other_features_is_refused() -> None:
    names = [*F.RANKER_FEATURES[:-1], "x_something_else"]
    with pytest.raises(IncompatibleModel, match="features differ"):
        RankerModel.from_bytes(tiny_booster(names), ModelMeta("v2", 0.0, tuple(names), F.FEATURE_SERVICE))


def test_a_corrupt_newest_model_falls_back_to_the_newest_good_one(settings_factory: Callable[..., Any]) -> None:
    """Truncated, altered or unreadable newer models leave the service on the newest model that loads (before:
    LightGBM aborted the whole process on the truncated text)."""
    settings: RecommendSettings = settings_factory(RecommendSettings, log_impressions=False)
    repository = RecommendRepository.open(settings)
    try:
        text = tiny_booster(list(F.RANKER_FEATURES))
        repository.save_model(text, ModelMeta("old-good", 1.0, F.RANKER_FEATURES, F.FEATURE_SERVICE))
        repository.save_model(text, ModelMeta("good", 2.0, F.RANKER_FEATURES, F.FEATURE_SERVICE))
        repository.save_model(text[: len(text) // 2], ModelMeta("corrupt", 3.0, F.RANKER_FEATURES, F.FEATURE_SERVICE))
        repository.save_model(text, ModelMeta("broken", 3.5, F.RANKER_FEATURES, F.FEATURE_SERVICE))
        repository.store.put(Namespace.MODELS, "ranker:broken:meta", b'{"version": "broken"')  # unreadable JSON
        # Altered after it was saved (structure intact, LightGBM would load it): the published digest catches it.
        repository.save_model(text, ModelMeta("altered", 4.0, F.RANKER_FEATURES, F.FEATURE_SERVICE))
        repository.store.put(Namespace.MODELS, "ranker:altered", text.replace(b"leaf_value=", b"leaf_value=9", 1))
        service = RecommendService(settings, repository)
        loaded, _ = service.reload_model()
        assert loaded == "good" and service.model is not None and service.model.meta.version == "good"
        assert "truncated" in service.skipped_models["corrupt"] or "whole" in service.skipped_models["corrupt"]
        assert "sha256" in service.skipped_models["altered"]
        assert "broken" in service.skipped_models
    finally:
        repository.close()


def test_the_service_loads_a_models_item_embeddings_and_skips_a_model_whose_embeddings_are_damaged(
    settings_factory: Callable[..., Any],
) -> None:
    settings: RecommendSettings = settings_factory(RecommendSettings, log_impressions=False)
    repository = RecommendRepository.open(settings)
    try:
        text = tiny_booster(list(F.RANKER_FEATURES))
        embeddings = ItemEmbeddings.fit([["a", "b", "c"], ["b", "c"], ["a", "d"], ["d", "c"]], dim=2)
        assert embeddings is not None
        repository.save_model(
            text, ModelMeta("with-embeddings", 1.0, F.RANKER_FEATURES, F.FEATURE_SERVICE), embeddings.to_bytes()
        )
        repository.save_model(text, ModelMeta("damaged", 2.0, F.RANKER_FEATURES, F.FEATURE_SERVICE), b"PK\x03\x04 cut")
        service = RecommendService(settings, repository)
        loaded, _ = service.reload_model()
        assert loaded == "with-embeddings" and service.model is not None
        assert service.model.embeddings is not None and service.model.embeddings.ids == embeddings.ids
        assert "unreadable" in service.skipped_models["damaged"]
        # A model saved without embeddings loads without them (its generator is then absent).
        repository.save_model(text, ModelMeta("plain", 3.0, F.RANKER_FEATURES, F.FEATURE_SERVICE))
        loaded, _ = service.reload_model()
        assert loaded == "plain" and service.model is not None and service.model.embeddings is None
    finally:
        repository.close()
