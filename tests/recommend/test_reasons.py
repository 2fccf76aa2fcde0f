"""Explanations in the visitor's language: `context.locale` (id / en) or the shop's default, every phrase in
both languages, and the API answering in the one asked for."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.common.settings import CommonSettings
from services.features import schema as F
from services.recommend.app import create_app
from services.recommend.ranking.ranker import _reason, _source_reason
from services.recommend.ranking.reasons import DAYPARTS, LOCALES, PHRASES, context_label, locale_of, say
from services.recommend.settings import RecommendSettings
from tests.conftest import SessionWorld


def test_the_locale_is_the_requests_language_else_the_shops_default() -> None:
    assert locale_of("id-ID", "en") == "id" and locale_of("ID", "en") == "id" and locale_of("en_US", "id") == "en"
    assert locale_of("fr-FR", "id") == "id" and locale_of(None, "en") == "en" and locale_of("", "id") == "id"


def test_every_phrase_and_daypart_has_both_languages_with_the_same_placeholders() -> None:
    for table in (PHRASES, DAYPARTS):
        for key, wording in table.items():
            assert set(wording) == set(LOCALES), key
            placeholders = {locale: set(re.findall(r"{(\w+)}", text)) for locale, text in wording.items()}
            assert placeholders["en"] == placeholders["id"], key
    assert context_label("Bandung", "evening", "id") == "di Bandung malam ini"
    assert context_label(None, "morning", "en") == "this morning"


def test_every_reason_a_feature_gives_is_worded_in_indonesian() -> None:
    values = {"i_discount": 0.3, "i_age_days": 3.0, "x_price_ratio": 1.0}
    english = {text for text in (PHRASES[k]["en"] for k in PHRASES) if "{" not in text}
    worded = 0
    for name in F.RANKER_FEATURES:
        value = values.get(name, 1.0)
        args = (name, value, "sepatu", "Eiger", 2, ["Tas Gunung"], "di Jakarta malam ini")
        indonesian, plain = _reason(*args, locale="id"), _reason(*args, locale="en")
        assert (indonesian is None) == (plain is None), name
        if indonesian is not None:
            worded += 1
            assert indonesian != plain and indonesian not in english, (name, indonesian)
    assert worded >= 12
    assert _source_reason("category", "sepatu", "", "id") == say("id", "more_from_category", category="sepatu")


@pytest.fixture(scope="module")
def client(world: SessionWorld, world_fork: CommonSettings) -> Iterator[TestClient]:
    # On a copy of the world: every answer logs its impressions, which would become events (and visitors) of
    # the world that later tests count.
    settings = RecommendSettings(
        **world_fork.model_dump(include={"data_dir", "redis_url", "namespace", "feast_project", "environment"}),
        default_locale="id",
    )
    with TestClient(create_app(settings, world.clock)) as recommend_client:
        yield recommend_client


def reasons_of(client: TestClient, visitor: str, locale: str | None) -> list[str]:
    context = {"device": "mobile", "city": "Jakarta", **({"locale": locale} if locale else {})}
    body = {"visitor_id": visitor, "explain": True, "context": context, "slots": [{"name": "home", "count": 8}]}
    answer = client.post("/v1/recommend", json=body)
    assert answer.status_code == 200, answer.text
    return [reason for item in answer.json()["slots"][0]["items"] for reason in item["reasons"]]


def test_the_api_explains_in_the_requested_language(client: TestClient, world: SessionWorld) -> None:
    visitors = [v.visitor_id for v in world.world.simulator.visitors[:5]]
    english_words = re.compile(r"\b(you|your|often|popular|trending|chosen|recommended|week|this)\b")
    indonesian_words = re.compile(r"\b(kamu|sering|populer|tren|dipilih|minggu|ini|di|baru|diskon|lainnya)\b")
    for visitor in visitors:
        shop_default = reasons_of(client, visitor, None)  # the settings say "id"
        asked_english = reasons_of(client, visitor, "en-US")
        assert shop_default and asked_english
        assert not any(english_words.search(r) for r in shop_default), shop_default
        assert any(indonesian_words.search(r) for r in shop_default), shop_default
        assert any(english_words.search(r) for r in asked_english), asked_english
    assert np.mean([len(reasons_of(client, v, "id-ID")) for v in visitors]) >= 8
