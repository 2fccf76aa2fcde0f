"""`selaras admin repartition` on a small log (real Redis, real Feast): refused while an aggregator holds a
lease; otherwise folds what is left, archives, moves idempotency keys, re-keys the archive and stores the new
count. Totals are exact before and after: every logged event once, folded once."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from services.cli import app as cli_app
from services.common.events import Event, envelope_visitor
from services.common.storage import PendingEvent, check_redis_durability, open_store, partition_log
from services.common.storage.repartition import check_log_partitions
from services.features.aggregations import SegmentRules
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from tests.factories import make_event


def events(start: int, count: int) -> list[Event]:
    kinds = ("product_view", "add_to_cart", "purchase")
    return [
        make_event(event_id=f"rp-{n}", visitor_id=f"rp-v{n % 23}", type=kinds[n % 3], item_id=f"rp-i{n % 7}")
        for n in range(start, start + count)
    ]


def use(settings: ProfileSettings, monkeypatch: pytest.MonkeyPatch, partitions: int) -> None:
    for name, value in {
        "SELARAS_DATA_DIR": str(settings.data_dir),
        "REDIS_URL": settings.redis_url or "",
        "SELARAS_NAMESPACE": settings.namespace,
        "SELARAS_FEAST_PROJECT": settings.feast_project,
        "SELARAS_ENVIRONMENT": "test",
        "SELARAS_LOG_PARTITIONS": str(partitions),
    }.items():
        monkeypatch.setenv(name, value)


def exact(repository: ProfileRepository, sent: list[Event]) -> None:
    states = repository.visitor_states(sorted({e.visitor_id for e in sent}))
    assert {v: s.event_count for v, s in states.items()} == dict(Counter(e.visitor_id for e in sent))
    views = {s.item_id: sum(s.buckets.get("views", {}).values()) for s in repository.all_item_states()}
    wanted = Counter(e.item_id for e in sent if e.type.value == "product_view")
    assert {k: v for k, v in views.items() if v} == dict(wanted)
    ids = [orjson.loads(e.payload)["event"]["event_id"] for e in repository.store.iter_log()]
    assert sorted(ids) == sorted(e.event_id for e in sent), "every logged event once, archive or hot"


def test_repartition_moves_the_log_to_more_partitions_exactly(
    settings_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings, log_partitions=2)
    repository = ProfileRepository.open(settings)
    sent = events(0, 400)
    try:
        IngestService(repository).ingest(sent)
        Aggregator(repository, SegmentRules(), settings.consent_defaults()).run_once(50)  # partly folded
        assert repository.unfolded_partitions()
        # A running aggregator's lease: refused, nothing changed.
        assert repository.store.acquire_lease(partition_log(1), "host:42:busy", 60)
        use(settings, monkeypatch, 2)
        refused = CliRunner().invoke(cli_app, ["admin", "repartition", "--partitions", "5"])
        assert refused.exit_code == 1, refused.output
        assert "aggregator-1 by host:42:busy" in " ".join(refused.output.split())
        assert repository.store.log_length() == 400
        repository.store.release_lease(partition_log(1), "host:42:busy")

        done = CliRunner().invoke(cli_app, ["admin", "repartition", "--partitions", "5"])
        assert done.exit_code == 0, done.output
        assert "the log now has 5 partitions (was 2)" in " ".join(done.output.split())
    finally:
        repository.close()

    moved = ProfileRepository.open(settings.model_copy(update={"log_partitions": 5}))
    try:
        store = moved.store
        assert store.log_length() == 0 and store.archive is not None and store.archive.count() == 400
        check_log_partitions(store)
        old = open_store(settings)
        try:  # every service checks the Redis settings at start (profile, recommend, aggregator): refused
            with pytest.raises(RuntimeError, match="SELARAS_LOG_PARTITIONS is 2 but the log has 5"):
                check_redis_durability(old, "development")
        finally:
            old.close()
        for file in store.archive.files():  # re-keyed: each visitor in its new partition
            visitors = pq.read_table(file.path, columns=["visitor_id"])["visitor_id"].to_pylist()
            assert {zlib.crc32(v.encode()) % 5 for v in visitors} == {file.partition}
        exact(moved, sent)
        # Re-sent events are still recognised in their new partition; new ones are folded by 5 partitions.
        again = store.append_events([PendingEvent(e.event_id, e.visitor_id, b"{}") for e in sent[:60]])
        assert again.accepted == 0
        later = events(400, 200)
        IngestService(moved).ingest(later)
        assert {store.partition_of(e.visitor_id) for e in later} == set(range(5))
        aggregator = Aggregator(moved, SegmentRules(), settings.consent_defaults())
        while aggregator.run_once(100).events:
            pass
        exact(moved, sent + later)
        assert all(envelope_visitor(e.payload) for e in store.iter_log())
    finally:
        moved.close()


def test_repartition_is_refused_on_the_embedded_store(
    settings_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings, redis_url=None)
    use(settings, monkeypatch, 1)
    monkeypatch.delenv("REDIS_URL")
    result = CliRunner().invoke(cli_app, ["admin", "repartition", "--partitions", "3"])
    assert result.exit_code == 2 and "embedded store keeps one log partition" in result.output
