"""Malformed decision logs give a clear exclusion count or a line-numbered error, never a traceback and never a
silent estimate: decisions without `properties.action`, without candidates, with a bad propensity, whose
message left the catalog, and files with an invalid line (`selaras evaluate messages`, `selaras train-messages`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from services.cli import app as cli
from services.common.catalog import CatalogItem
from services.common.consent import Consent
from services.common.events import Event
from services.common.settings import CommonSettings
from services.demo.shop import generate_shop
from services.messages.decision_log import encode_candidates
from services.messages.ope import NOTHING, evaluate_messages
from services.messages.replay import replay_decisions
from services.messages.repository import MessageRepository
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.recommend.repository import RecommendRepository
from tests.conftest import REDIS_URL
from tests.factories import make_item
from tests.messages.test_message_endpoints import drop_feast_rows

START = datetime(2026, 11, 2, 3, tzinfo=UTC)
CATALOG: list[CatalogItem] = generate_shop(seed=3, n_products=10, now=START).messages
A, B = CATALOG[0].item_id, CATALOG[1].item_id


def decision(i: int, **changes: Any) -> dict[str, Any]:
    """A well-formed logged decision (uniform over nothing, A and B), with `changes` to its properties
    (None deletes one) or, for `recommendation_id`, to the event."""
    sent = (None, A, B)[i % 3]
    properties: dict[str, Any] = {
        "action": "send" if sent else "none",
        "channel": "email",
        "propensity": 1 / 3,
        "candidates": encode_candidates([(A, None), (B, None)]),
        "control": False,
    }
    recommendation_id = changes.pop("recommendation_id", f"r{i}")
    for key, value in changes.items():
        if value is None:
            properties.pop(key, None)
        else:
            properties[key] = value
    event: dict[str, Any] = {
        "event_id": f"msg:{i}",
        "visitor_id": f"v{i}",
        "type": "message_sent",
        "timestamp": (START + timedelta(minutes=i)).isoformat(),
        "item_id": sent or "none",
        "properties": properties,
    }
    if recommendation_id:
        event["recommendation_id"] = recommendation_id
    return event


def purchase(i: int) -> dict[str, Any]:
    return {
        "event_id": f"buy:{i}",
        "visitor_id": f"v{i}",
        "type": "purchase",
        "timestamp": (START + timedelta(minutes=i, hours=2)).isoformat(),
        "item_id": "p-1",
        "price": 10_000,
    }


def page_view(visitor_id: str, **after_start: float) -> dict[str, Any]:
    moment = START + timedelta(**after_start)
    return {"event_id": f"view:{visitor_id}:{moment}", "visitor_id": visitor_id, "type": "page_view",
            "timestamp": moment.isoformat()}  # fmt: skip


def log(n: int, **changes: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rows.append(decision(i, **changes))
    rows.extend(purchase(i) for i in range(0, n, 4))
    rows.sort(key=lambda row: row["timestamp"])
    return rows


def events(rows: list[dict[str, Any]]) -> list[Event]:
    return [Event.model_validate(row) for row in rows]


def test_malformed_decisions_are_left_out_and_counted_by_reason() -> None:
    rows = log(30)
    rows += [
        decision(100, action=None),
        decision(101, action="maybe"),
        decision(102, candidates=None),
        decision(103, propensity=0),
        decision(104, propensity=1.5),
        decision(105, propensity="high"),
        decision(106, propensity=None),
        decision(107, recommendation_id=""),
        {**decision(109), "item_id": "gone-template"},  # sent a message the catalog lost,
    ]
    data = replay_decisions(events(rows), CATALOG)
    assert data.size == 30
    assert data.excluded == {
        "no_action": 2,
        "no_candidates": 1,
        "invalid_propensity": 3,
        "no_propensity": 1,
        "no_recommendation_id": 1,
        "unknown_message": 1,
    }
    evaluation = evaluate_messages(data, None)
    assert evaluation.excluded == data.excluded and evaluation.to_json()["excluded"] == data.excluded


def test_a_log_without_action_is_refused_not_read_as_sending_nothing() -> None:
    data = replay_decisions(events(log(60, action=None)), CATALOG)
    assert data.size == 0 and data.excluded == {"no_action": 60}
    with pytest.raises(ValueError, match="no logged decisions"):
        evaluate_messages(data, None)


def test_decisions_without_candidate_rows_give_estimates_not_an_index_error() -> None:
    data = replay_decisions(events(log(60, candidates=None)), CATALOG)
    assert data.size == 0 and data.excluded == {"no_candidates": 60}
    # Decisions that kept no candidate row (every "nothing"): evaluation answers for "send nothing" only.
    unsent = replay_decisions(events(log(60)), CATALOG)
    only_nothing = unsent.subset(unsent.action < 0)
    only_nothing = only_nothing.subset(np.ones(only_nothing.size, dtype=bool))
    only_nothing.cand_owner = only_nothing.cand_owner[:0]
    only_nothing.cand_template, only_nothing.cand_product, only_nothing.A = [], [], only_nothing.A[:0]
    evaluation = evaluate_messages(only_nothing, None)
    assert [p.policy for p in evaluation.policies] == [NOTHING]
    assert evaluation.policies[0].matched == only_nothing.size == 20


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> Iterator[CommonSettings]:
    made: CommonSettings = settings_factory(CommonSettings, redis_timeout_s=5.0)
    yield made
    drop_feast_rows(REDIS_URL, made.feast_project)


def run_cli(monkeypatch: pytest.MonkeyPatch, settings: CommonSettings, *args: str) -> tuple[int, str]:
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SELARAS_NAMESPACE", settings.namespace)
    monkeypatch.setenv("SELARAS_FEAST_PROJECT", settings.feast_project)
    monkeypatch.setenv("SELARAS_ENVIRONMENT", "test")
    monkeypatch.setenv("SELARAS_REDIS_TIMEOUT_S", "5")
    monkeypatch.setenv("COLUMNS", "240")
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(settings.data_dir)], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.split())


def write(path: Path, rows: list[dict[str, Any]], extra: bytes = b"") -> Path:
    path.write_bytes(b"\n".join(orjson.dumps(row) for row in rows) + b"\n" + extra)
    return path


def test_evaluate_messages_reports_exclusions_and_invalid_lines(
    settings: CommonSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = write(tmp_path / "catalog.jsonl", [item.model_dump(mode="json") for item in CATALOG])
    mixed = write(tmp_path / "mixed.jsonl", [*log(90), *(decision(200 + i, action=None) for i in range(7))])
    code, output = run_cli(monkeypatch, settings, "evaluate", "messages", str(mixed), "--catalog", str(catalog))
    assert code == 0, output
    assert "7 of 97 logged decisions left out: 7 without properties.action" in output
    assert "on 90 decisions" in output

    no_action = write(tmp_path / "no_action.jsonl", log(30, action=None))
    code, output = run_cli(monkeypatch, settings, "evaluate", "messages", str(no_action), "--catalog", str(catalog))
    assert code == 2
    assert "30 of 30 logged decisions left out" in output and "cannot evaluate: no logged decisions" in output

    no_candidates = write(tmp_path / "no_candidates.jsonl", log(30, candidates=None))
    code, output = run_cli(monkeypatch, settings, "evaluate", "messages", str(no_candidates), "--catalog", str(catalog))
    assert code == 2 and "30 without properties.candidates" in output

    rows = log(4)
    broken = write(tmp_path / "broken.jsonl", rows[:2], b'{"event_id": "x", "type": "message_sent"}\n')
    code, output = run_cli(monkeypatch, settings, "evaluate", "messages", str(broken), "--catalog", str(catalog))
    assert code == 2 and "line 3" in output and "visitor_id" in output
    not_json = write(tmp_path / "not_json.jsonl", rows[:1], b"{oops\n")
    code, output = run_cli(monkeypatch, settings, "evaluate", "messages", str(not_json), "--catalog", str(catalog))
    assert code == 2 and "line 2" in output and "not JSON" in output


def test_train_messages_reports_exclusions_and_refuses_a_log_with_nothing_valid(
    settings: CommonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = ProfileRepository.open(settings)
    try:
        profile.upsert_catalog(CATALOG)
        IngestService(profile).ingest(events(log(40, action=None)))
    finally:
        profile.close()
    code, output = run_cli(monkeypatch, settings, "train-messages")
    assert code == 2
    assert "40 of 40 logged decisions left out: 40 without properties.action" in output
    assert "cannot train: no logged message decisions" in output


def test_replay_measures_visits_and_revenue_in_the_outcome_window() -> None:
    product = make_item(item_id="p-9", price=40_000)
    rows = [decision(0), decision(1), decision(2)]  # v0 nothing, v1 sent A, v2 sent B; each at START + i min
    rows += [
        {**purchase(1), "price": None, "quantity": 2, "item_id": "p-9"},  # 2 x catalog price, 2 h after
        {**purchase(1), "event_id": "buy:late", "timestamp": (START + timedelta(hours=30)).isoformat()},
        page_view("v0", hours=3),
        page_view("v2", hours=-1),
    ]
    rows.sort(key=lambda row: row["timestamp"])
    data = replay_decisions(events(rows), [*CATALOG, product], window_h=24.0)
    assert data.visitor_ids == ["v0", "v1", "v2"]
    assert data.visited.tolist() == [True, True, False]  # a purchase is a visit; v2's view came before the send
    assert data.revenue.tolist() == [0.0, 80_000.0, 0.0]  # the purchase 30 h later is outside the window
    assert data.subset(np.array([False, True, True])).revenue.tolist() == [80_000.0, 0.0]


def test_train_messages_learns_visits_directly_and_evaluate_scores_them(
    settings: CommonSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = log(240)
    # Message A brings most visitors back within a day, B some, nothing few (no opens or clicks logged).
    share = {0: 0.1, 1: 0.8, 2: 0.4}
    rng = np.random.default_rng(5)
    rows += [page_view(f"v{i}", hours=5, minutes=i) for i in range(240) if rng.random() < share[i % 3]]
    rows.sort(key=lambda row: row["timestamp"])
    profile = ProfileRepository.open(settings)
    try:
        profile.upsert_catalog(CATALOG)
        IngestService(profile).ingest(events(rows))
    finally:
        profile.close()
    code, output = run_cli(monkeypatch, settings, "train-messages", "--learner", "uplift", "--reward", "visit")
    assert code == 0, output
    assert "(uplift, visit)" in output and "treated" in output and "measured against the control group" not in output
    catalog = write(tmp_path / "catalog.jsonl", [item.model_dump(mode="json") for item in CATALOG])
    file = write(tmp_path / "log.jsonl", rows)
    report = tmp_path / "ope.json"
    code, output = run_cli(
        monkeypatch, settings, "evaluate", "messages", str(file), "--catalog", str(catalog), "--reward", "visit",
        "--json", str(report),
    )  # fmt: skip
    assert code == 0, output
    body = orjson.loads(report.read_bytes())
    assert body["reward"] == "visit" and body["decisions"] == 240
    policies = {p["policy"]: p for p in body["policies"]}
    assert policies[f"only:{A}"]["dr"][0] > policies[NOTHING]["dr"][0] + 0.4
    code, output = run_cli(monkeypatch, settings, "train-messages", "--reward", "clicks")
    assert code == 2 and "reward must be one of" in output


def test_train_messages_leaves_out_visitors_who_refuse_analytics(
    settings: CommonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A visitor who refused the analytics purpose (now, after the sends) is never trained on."""
    rows = log(120)
    profile = ProfileRepository.open(settings)
    try:
        profile.upsert_catalog(CATALOG)
        IngestService(profile).ingest(events(rows))
        refusing = {f"v{i}": Consent().merged({"analytics": False}, START.timestamp()) for i in range(0, 120, 10)}
        profile.save_consents(refusing)
    finally:
        profile.close()
    code, output = run_cli(monkeypatch, settings, "train-messages")
    assert code == 0, output
    assert "12 of 120 logged decisions left out: 12 of visitors who refuse analytics" in output
    messages = MessageRepository(RecommendRepository.open(settings))
    try:
        assert messages.refusing_analytics([f"v{i}" for i in range(120)], settings.consent_defaults()) == set(refusing)
    finally:
        messages.base.close()
