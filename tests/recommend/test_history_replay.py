"""One model, one number: the offline figures of the published protocol and a replay of the same test users
through the live API (profile ingest + aggregator on real Redis and Feast, the saved model, POST
/v1/recommend) agree within sampling error."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from services.common.clock import FixedClock
from services.features.aggregations import SegmentRules
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.profile.sequences import SYNTHETIC_STEP_S, catalog_items, purchase_events, read_histories
from services.profile.settings import ProfileSettings
from services.recommend.app import create_app
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings
from services.recommend.training.histories import MAX_EXCLUDED, train_on_histories
from services.recommend.training.history_eval import PIPELINE, evaluate_histories
from services.recommend.training.train import TrainConfig
from tests.recommend.test_history_eval import write_histories


def test_offline_figures_and_a_replay_through_the_api_agree(
    settings_factory: Callable[..., Any], tmp_path: Path
) -> None:
    path = write_histories(tmp_path, users=200, seed=5)
    histories = read_histories(path, tmp_path / "Walk_item2attributes.json")
    held = histories.truncated(1)  # what the live shop knows: everything but each user's last purchase
    no_experiments = tmp_path / "experiments.yaml"
    no_experiments.write_text("holdout: 0\nexperiments: []\n")
    recommend_settings: RecommendSettings = settings_factory(RecommendSettings, experiments_file=no_experiments)
    profile_settings: ProfileSettings = settings_factory(
        ProfileSettings, namespace=recommend_settings.namespace, feast_project=recommend_settings.feast_project
    )
    config = TrainConfig(max_queries=10**6)
    model, text, _ = train_on_histories(held, recommend_settings.max_candidates, config)
    offline = evaluate_histories("Walk", histories, recommend_settings, config, model=model).methods[PIPELINE]

    events = list(purchase_events(held))
    clock = FixedClock(events[-1].ts + SYNTHETIC_STEP_S)  # the moment the offline snapshot is taken
    profile = ProfileRepository.open(profile_settings)
    try:
        profile.upsert_catalog(catalog_items(histories))
        aggregator = Aggregator(
            profile, SegmentRules(), profile_settings.consent_defaults(), offline_rows=False, clock=clock
        )
        IngestService(profile, clock).ingest(events)
        while aggregator.run_once(5000).events:
            pass
    finally:
        profile.close()
    repository = RecommendRepository.open(recommend_settings)
    try:
        assert model.embeddings is not None  # the served model ships its item embeddings
        repository.save_model(text, model.meta, model.embeddings.to_bytes())
    finally:
        repository.close()

    hits = []
    with TestClient(create_app(recommend_settings, clock)) as client:
        served = client.app.state.recommend.service.model  # type: ignore[attr-defined]
        assert served.embeddings is not None and served.embeddings.ids == model.embeddings.ids
        for user, sequence in zip(histories.users, histories.sequences, strict=True):
            slot = {
                "name": "replay",
                "count": 10,
                "max_per_category": 10,
                "filters": {"exclude_items": sequence[:-1][-MAX_EXCLUDED:]},
            }
            response = client.post("/v1/recommend", json={"visitor_id": user, "slots": [slot]})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_version"] == model.meta.version and body["strategy"] == "personalized"
            hits.append(sequence[-1] in [item["item_id"] for item in body["slots"][0]["items"]])
    live = sum(hits) / len(hits)
    assert live > 0.3  # the walk is predictable: a broken replay would not find it
    # Two estimates of the same rate on the same 200 users: within the sampling error of their difference.
    standard_error = math.sqrt(2 * offline["hr@10"] * (1 - offline["hr@10"]) / len(hits))
    assert abs(live - offline["hr@10"]) <= 1.96 * standard_error, (live, offline["hr@10"])
