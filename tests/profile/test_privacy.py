"""Erasure, export and retention on real Redis + Feast: an erased visitor is absent from the log, the online
and offline stores, experiment state and a training set built afterwards; export returns what is kept;
retention drops history older than the period. No visitor id reaches the service logs."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
import redis
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services.cli import app as cli_app
from services.common.consent import PURPOSES
from services.common.events import Event
from services.common.storage import Namespace
from services.experiments.store import open_experiment_store
from services.experiments.store.base import ExposureWrite
from services.features import schema as F
from services.features.aggregations import SegmentRules
from services.features.store import online_rows
from services.messages.repository import MESSAGE_HISTORY
from services.profile.aggregator.worker import Aggregator
from services.profile.app import create_app
from services.profile.ingest import IngestService
from services.profile.privacy.repository import PrivacyRepository
from services.profile.privacy.service import PrivacyService
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from services.recommend.repository import RecommendRepository
from services.recommend.training.train import Query, TrainConfig, Trainer
from tests.conftest import REDIS_URL, RedisServer, clean_namespace, unique_name
from tests.factories import BASE_TIME, make_event_dict, make_item

ADMIN = {"X-API-Key": "privacy-admin-key-0123456789"}
ERASED, KEPT = "erase-me", "keep-me"
EXPERIMENT_ID = "exp-a-1"
REMOVED_EXPERIMENT_ID = "exp-old-1"  # state of an experiment no longer in the config (not in the registry)
MENTION = "keep-me-mentions-erase-me"


def history(visitor_id: str, start: datetime, days: int = 3) -> list[Event]:
    events = []
    for day in range(days):
        at = start + timedelta(days=day)
        for n, (kind, item) in enumerate(
            [("product_view", "pv-1"), ("product_view", "pv-2"), ("add_to_cart", "pv-2"), ("purchase", "pv-2")]
        ):
            fields = {
                "event_id": f"{visitor_id}-{day}-{n}",
                "visitor_id": visitor_id,
                "type": kind,
                "item_id": item,
                "timestamp": (at + timedelta(minutes=n)).isoformat(),
            }
            events.append(Event.model_validate(make_event_dict(**fields)))
    return events


@dataclass
class Shop:
    settings: ProfileSettings
    client: TestClient
    events: dict[str, list[Event]]

    @property
    def state(self) -> Any:
        return self.client.app.state.profile  # type: ignore[attr-defined]

    def fold(self) -> None:
        while self.state.aggregator.run_once(5000).events:
            pass


@contextlib.contextmanager
def open_shop(data_dir: Path, redis_url: str) -> Iterator[Shop]:
    """Two visitors' folded histories behind the profile app (its aggregator off: the tests fold)."""
    from services.common.auth import hash_key

    namespace = unique_name("priv")
    settings = ProfileSettings(
        data_dir=data_dir,
        redis_url=redis_url,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        api_keys=f"ops:admin:{hash_key(ADMIN['X-API-Key'])}",
        aggregator_enabled=False,  # the tests fold explicitly, so every step is deterministic
    )
    with TestClient(create_app(settings)) as client:
        state = client.app.state.profile  # type: ignore[attr-defined]
        state.repository.upsert_catalog([make_item(item_id="pv-1"), make_item(item_id="pv-2", price=90_000)])
        # The other visitor's last event mentions the erased id (the bytes a substring match would hit).
        mention = Event.model_validate(
            make_event_dict(
                event_id=MENTION,
                visitor_id=KEPT,
                type="page_view",
                item_id=None,
                price=None,
                timestamp=(BASE_TIME + timedelta(days=3)).isoformat(),
                properties={"visitor_id": ERASED},
            )
        )
        events = {ERASED: history(ERASED, BASE_TIME), KEPT: [*history(KEPT, BASE_TIME + timedelta(hours=1)), mention]}
        state.ingest.ingest(sorted(events[ERASED] + events[KEPT], key=lambda e: e.ts))
        built = Shop(settings, client, events)
        built.fold()
        yield built
    clean_namespace(redis_url, namespace)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    with open_shop(tmp_path_factory.mktemp("privacy"), REDIS_URL) as built:
        yield built


def seed_other_holders(shop: Shop) -> None:
    """A recommendation record and experiment state that name the visitor (written by the recommend side)."""
    store = shop.state.repository.store
    record = {"visitor_id": ERASED, "ts": time.time(), "slots": {"home": ["pv-1"]}, "experiment": "exp-a"}
    recommend = RecommendRepository(store, shop.state.repository.feature_store)  # the writer the service uses
    recommend.save_recommendation("rec-erased", record, 3600)
    recommend.save_recommendation("rec-kept", {**record, "visitor_id": KEPT}, 3600)
    sent = {"s": [[BASE_TIME.timestamp(), "push", "cart-reminder"]], "t": {"push": BASE_TIME.timestamp()}}
    store.put(MESSAGE_HISTORY, ERASED, orjson.dumps(sent))
    experiments = open_experiment_store(shop.settings)
    try:
        entry = {
            "key": "exp-a",
            "id": EXPERIMENT_ID,
            "window_s": 86400.0,
            "slots": [],
            "channels": [],
            "arms": ["a", "b"],
        }
        experiments.publish_registry({"exp-a": entry})
        for visitor_id in (ERASED, KEPT):
            experiments.record_exposure(
                ExposureWrite(EXPERIMENT_ID, visitor_id, "b", "all", BASE_TIME.timestamp(), {"all": {"ctr": 3.0}})
            )
            # An exposure record (kept for attribution) that names the visitor, in an experiment since removed.
            record = {"visitor_id": visitor_id, "ts": BASE_TIME.timestamp(), "arm": "a", "slots": {}}
            experiments.record_exposure(
                ExposureWrite(
                    REMOVED_EXPERIMENT_ID,
                    visitor_id,
                    "a",
                    "all",
                    BASE_TIME.timestamp(),
                    {"all": {"ctr": 1.0}},
                    recommendation_id=f"rec-{visitor_id}",
                    record=record,
                )
            )
    finally:
        experiments.close()


def training_view(settings: ProfileSettings, visitor_ids: list[str], at: datetime) -> tuple[set[str], list[bool]]:
    """A training set built now: which visitors have queries, and whether point-in-time rows know them."""
    repository = RecommendRepository.open(settings)
    try:
        trainer = Trainer(repository, TrainConfig())
        events, catalog = trainer.load()
        queries = trainer.behaviour_queries(events, {item.item_id for item in catalog})
        probes = [Query(v, at.timestamp(), "mobile", "web", "Jakarta", 420) for v in visitor_ids]
        rows = trainer.visitor_rows(probes)
    finally:
        repository.close()
    return {q.visitor_id for q in queries}, [vector.known for vector, _ in rows]


def test_export_returns_everything_kept(shop: Shop) -> None:
    seed_other_holders(shop)
    assert shop.client.put(f"/v1/profiles/{ERASED}/consent", json={"marketing_email": True}, headers=ADMIN).is_success
    export = shop.client.get(f"/v1/profiles/{ERASED}/export", headers=ADMIN).json()
    events = shop.events[ERASED]
    assert export["visitor_id"] == ERASED
    assert [e["event_id"] for e in export["events"]] == [e.event_id for e in events]
    assert export["consent"]["given"] == {"marketing_email": True}
    assert export["consent"]["resolved"]["marketing_email"] is True
    assert export["profile_state"]["visitor_id"] == ERASED and export["profile_state"]["orders"] == 3
    assert export["online_features"]["event_count"] == len(events)
    assert len(export["feature_history"]) == len(events)  # one point-in-time row per folded event
    assert {row[F.VISITOR_KEY] for row in export["feature_history"]} == {ERASED}
    assert list(export["recommendations"]) == ["rec-erased"]
    assert export["other"]["experiment_state"][EXPERIMENT_ID]["arm"] == "b"
    # An experiment no longer configured still holds the visitor's values: the export shows them too.
    assert export["other"]["experiment_state"][REMOVED_EXPERIMENT_ID]["arm"] == "a"
    assert export["other"]["message_history"]["sends"][0]["message"] == "cart-reminder"
    orjson.dumps(export)  # plain JSON all the way down
    assert shop.client.get("/v1/profiles/nobody-here/export", headers=ADMIN).status_code == 404
    # Path ids are normalised like ids in events: " v1 " in a URL is the visitor the events called " v1 ".
    padded = shop.client.get(f"/v1/profiles/%20{ERASED}%20/export", headers=ADMIN)
    assert padded.status_code == 200 and padded.json()["visitor_id"] == ERASED


def test_erasure_and_export_cost_the_visitors_data_not_the_whole_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """On a Redis holding many other keys (another shop, another service), erasure and export find the
    visitor's data by key and index: no SCAN or KEYS walks the database (in production it holds millions of
    keys, and a scan made one erasure take seconds). Counted by Redis itself (INFO commandstats)."""
    client = redis.Redis.from_url(redis_server.url)
    pipe = client.pipeline(transaction=False)
    for n in range(20_000):
        pipe.set(f"other-shop:key:{n}", b"x")
    pipe.execute()
    with open_shop(tmp_path, redis_server.url) as private:
        seed_other_holders(private)
        before: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
        export = private.client.get(f"/v1/profiles/{ERASED}/export", headers=ADMIN)
        receipt = private.client.delete(f"/v1/profiles/{ERASED}", headers=ADMIN)
        after: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    assert export.status_code == 200 and list(export.json()["recommendations"]) == ["rec-erased"]
    assert receipt.status_code == 200 and receipt.json()["recommendation_records"] == 1
    assert receipt.json()["holders"] == {"experiment_state": 2, "experiment_exposures": 1, "message_history": 1}
    calls = {name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"] for name in after}
    assert calls.get("cmdstat_scan", 0) == 0 and calls.get("cmdstat_keys", 0) == 0, calls
    # Bounded by the visitor's data: a few hundred commands, not one per key of the database.
    assert sum(calls.values()) < 1_000, calls
    client.close()


@pytest.mark.slow
def test_erasure_removes_the_visitor_everywhere_and_from_later_training(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    seed_other_holders(shop)
    assert shop.client.put(f"/v1/profiles/{ERASED}/consent", json={"marketing_push": True}, headers=ADMIN).is_success
    probe_at = BASE_TIME + timedelta(days=2, hours=12)  # point in time inside both visitors' histories
    visitors_before, known_before = training_view(shop.settings, [ERASED, KEPT], probe_at)
    assert {ERASED, KEPT} <= visitors_before and known_before == [True, True]  # the control: both are there

    caplog.set_level(logging.DEBUG)
    response = shop.client.delete(f"/v1/profiles/{ERASED}", headers=ADMIN)
    assert response.status_code == 200, response.text
    receipt = response.json()
    n = len(shop.events[ERASED])
    assert receipt["visitor_id"] == ERASED
    assert (receipt["log_events"], receipt["idempotency_keys"]) == (n, n)
    assert (receipt["visitor_state"], receipt["online_rows"], receipt["consent"]) == (1, 1, "kept_as_refused")
    assert receipt["offline_rows"] == n and receipt["offline_files_rewritten"] >= 1
    assert receipt["recommendation_records"] == 1
    assert receipt["holders"] == {"experiment_state": 2, "experiment_exposures": 1, "message_history": 1}
    # No visitor id in what the services log.
    service_logs = [r.getMessage() for r in caplog.records if not r.name.startswith("httpx")]
    assert not [line for line in service_logs if ERASED in line]

    # Gone from every store ...
    repository = shop.state.repository
    assert repository.visitor_states([ERASED]) == {}
    tombstone = repository.consents([ERASED])[ERASED]  # the proof of the request: every purpose refused
    assert set(tombstone.given) == set(PURPOSES) and not any(tombstone.given.values())
    assert any(MENTION.encode() in entry.payload for entry in repository.store.iter_log())
    assert online_rows(repository.feature_store, F.VISITOR_VIEW, [ERASED])[0]["event_count"] is None
    history_ids = pq.read_table(shop.settings.offline_dir / F.VISITOR_VIEW, columns=[F.VISITOR_KEY])
    assert ERASED not in set(history_ids[F.VISITOR_KEY].to_pylist())
    assert repository.store.get(Namespace.RECOMMENDATIONS, "rec-erased") is None
    experiments = open_experiment_store(shop.settings)
    try:
        assert experiments.visitor_heads([EXPERIMENT_ID, REMOVED_EXPERIMENT_ID], [ERASED]) == {}
        assert len(experiments.visitor_heads([EXPERIMENT_ID, REMOVED_EXPERIMENT_ID], [KEPT])) == 2  # only ERASED
        records = experiments.exposure_records([REMOVED_EXPERIMENT_ID], [f"rec-{ERASED}", f"rec-{KEPT}"])
        assert list(records) == [f"rec-{KEPT}"]
    finally:
        experiments.close()
    export = shop.client.get(f"/v1/profiles/{ERASED}/export", headers=ADMIN).json()  # what is kept: the refusal
    assert export["events"] == [] and export["profile_state"] is None and export["feature_history"] == []
    assert not any(export["consent"]["resolved"].values())

    # ... and from a training set built afterwards; the other visitor is untouched.
    visitors_after, known_after = training_view(shop.settings, [ERASED, KEPT], probe_at)
    assert ERASED not in visitors_after and KEPT in visitors_after
    assert known_after == [False, True]
    assert repository.store.get(Namespace.RECOMMENDATIONS, "rec-kept") is not None
    assert online_rows(repository.feature_store, F.VISITOR_VIEW, [KEPT])[0]["event_count"] == len(shop.events[KEPT])

    # Erasure is idempotent, and the idempotency keys are gone too: re-sent events are new data ...
    again = shop.client.delete(f"/v1/profiles/{ERASED}", headers=ADMIN).json()
    assert again["log_events"] == 0 and again["offline_rows"] == 0 and again["visitor_state"] == 0
    assert shop.state.ingest.ingest(shop.events[ERASED][:2]).accepted == 2
    shop.fold()
    # ... but the tombstone keeps them from rebuilding a profile (the next visit, re-sent events).
    assert repository.visitor_states([ERASED]) == {}
    assert online_rows(repository.feature_store, F.VISITOR_VIEW, [ERASED])[0]["event_count"] is None
    shop.client.delete(f"/v1/profiles/{ERASED}", headers=ADMIN)


def test_erasure_needs_the_admin_scope(shop: Shop) -> None:
    assert shop.client.delete(f"/v1/profiles/{KEPT}").status_code == 401
    assert shop.client.get(f"/v1/profiles/{KEPT}/export").status_code == 401


def test_retention_drops_history_older_than_the_period(shop: Shop, monkeypatch: pytest.MonkeyPatch) -> None:
    # A visitor whose history is two years old, next to the recent visitors of this shop.
    old_start = datetime.now(UTC) - timedelta(days=800)
    old = history("old-visitor", old_start, days=2)
    shop.state.ingest.ingest(old)
    shop.fold()
    repository = shop.state.repository
    kept_before = repository.store.log_length() - len(old)
    settings = shop.settings
    for name, value in {
        "SELARAS_DATA_DIR": str(settings.data_dir),
        "REDIS_URL": REDIS_URL,
        "SELARAS_NAMESPACE": settings.namespace,
        "SELARAS_FEAST_PROJECT": settings.feast_project,
    }.items():
        monkeypatch.setenv(name, value)
    # BASE_TIME (the other visitors) is in late 2026: keep 400 days from now.
    dry = CliRunner().invoke(cli_app, ["retention", "--days", "400", "--dry-run", "--data-dir", str(settings.data_dir)])
    assert dry.exit_code == 0, dry.output
    assert f"would delete {len(old)} logged events and {len(old)} offline" in " ".join(dry.output.split())
    assert repository.store.log_length() == kept_before + len(old)

    result = CliRunner().invoke(cli_app, ["retention", "--days", "400", "--data-dir", str(settings.data_dir)])
    assert result.exit_code == 0, result.output
    assert repository.store.log_length() == kept_before
    table = pq.read_table(settings.offline_dir / F.VISITOR_VIEW, columns=[F.VISITOR_KEY, F.TIMESTAMP_FIELD])
    assert "old-visitor" not in set(table[F.VISITOR_KEY].to_pylist())
    assert KEPT in set(table[F.VISITOR_KEY].to_pylist())


def test_erasure_on_the_embedded_stores(settings_factory: Callable[..., Any]) -> None:
    """The same erasure on SQLite (event log, blobs and the Feast online store): `make demo`'s stores."""
    settings: ProfileSettings = settings_factory(ProfileSettings, redis_url=None)
    repository = ProfileRepository.open(settings)
    try:
        repository.upsert_catalog([make_item(item_id="pv-1"), make_item(item_id="pv-2")])
        aggregator = Aggregator(repository, SegmentRules(), settings.consent_defaults())
        IngestService(repository).ingest(history(ERASED, BASE_TIME) + history(KEPT, BASE_TIME + timedelta(hours=1)))
        while aggregator.run_once(5000).events:
            pass
        privacy = PrivacyService(
            PrivacyRepository(repository.store, repository.feature_store, settings.offline_dir),
            settings.consent_defaults(),
        )
        receipt = privacy.erase(ERASED)
        assert (receipt.log_events, receipt.visitor_state, receipt.online_rows, receipt.offline_rows) == (12, 1, 1, 12)
        assert online_rows(repository.feature_store, F.VISITOR_VIEW, [ERASED])[0]["event_count"] is None
        assert online_rows(repository.feature_store, F.VISITOR_VIEW, [KEPT])[0]["event_count"] == 12
        assert repository.store.log_length() == 12
        assert repository.visitor_states([ERASED]) == {} and privacy.known(KEPT)
        assert not any(repository.consents([ERASED])[ERASED].given.values())  # the tombstone
    finally:
        repository.close()


def test_impressions_written_after_the_erasure_do_not_rebuild_the_profile(shop: Shop) -> None:
    """A recommend process still holds impressions and a recommendation record of the visitor (queued before
    the erasure) and writes them after it: its writer re-checks consent and drops them; and impressions that
    reach the log anyway are not folded, because the aggregator reads the tombstone."""
    visitor = "erased-in-flight"
    shop.state.ingest.ingest(history(visitor, BASE_TIME, days=1))
    shop.fold()
    assert shop.state.repository.visitor_states([visitor])
    impressions = [
        Event.model_validate(
            make_event_dict(
                visitor_id=visitor,
                type="impression",
                item_id="pv-1",
                recommendation_id="rec-in-flight",
                timestamp=(BASE_TIME + timedelta(days=1, minutes=n)).isoformat(),
            )
        )
        for n in range(3)
    ]
    receipt = shop.client.delete(f"/v1/profiles/{visitor}", headers=ADMIN).json()
    assert receipt["visitor_state"] == 1 and receipt["consent"] == "kept_as_refused"

    store = shop.state.repository.store
    before = store.log_length()
    recommend_side = RecommendRepository.open(shop.settings)
    record = {"visitor_id": visitor, "ts": BASE_TIME.timestamp(), "slots": {"home": ["pv-1"]}}
    try:
        assert recommend_side.log_events_async(list(impressions[:2]), ("rec-in-flight", record, 3600))
    finally:
        recommend_side.close()  # drains the writer's queue
    assert store.log_length() == before  # the writer dropped them ...
    assert store.get(Namespace.RECOMMENDATIONS, "rec-in-flight") is None

    shop.state.ingest.ingest(impressions[2:])  # ... and one that reaches the log anyway is not folded
    assert store.log_length() == before + 1
    shop.fold()
    assert shop.state.repository.visitor_states([visitor]) == {}
    assert online_rows(shop.state.repository.feature_store, F.VISITOR_VIEW, [visitor])[0]["event_count"] is None
