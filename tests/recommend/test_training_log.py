"""Training's reading of the log (`Trainer.load`): streamed from the archive and the hot window into compact
columns, in event-time order, without the visitors who refuse analytics: the same sequence the whole log
loaded as a list and sorted gave."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest

from services.common.consent import Consent
from services.common.events import Event, envelope
from services.common.settings import CommonSettings
from services.common.storage import Namespace, PendingEvent, Store, partition_log
from services.common.storage.archiver import archive_log
from services.recommend.repository import RecommendRepository
from services.recommend.training.event_columns import EventColumns, LoggedEvent
from services.recommend.training.train import TrainConfig, Trainer
from tests.factories import BASE_TIME, make_event

KINDS = ("product_view", "product_view", "add_to_cart", "purchase", "impression", "click", "search")
ZONES = (timezone(timedelta(hours=7)), timezone(timedelta(hours=8)), UTC)
REFUSING = {"v3", "v11"}


def shuffled_history(count: int, seed: int = 3) -> list[Event]:
    """Events of 20 visitors over two days, in a random order (a log receives late and imported events), with
    ties in time, impressions of two slots, clicks echoing them and contexts with and without city or device."""
    rng = random.Random(seed)
    events = []
    for n in range(count):
        kind = KINDS[rng.randrange(len(KINDS))]
        extra: dict[str, Any] = {}
        if kind in ("impression", "click"):
            extra["recommendation_id"] = f"rec-{rng.randrange(15)}"
        if kind == "impression":
            extra["properties"] = {"slot": rng.choice(["home", "pdp"])}
        if kind == "search":
            extra["query"] = "kemeja"
            extra["item_id"] = None
        context: dict[str, Any] = {"channel": rng.choice(["web", "app"])}
        if rng.random() < 0.7:
            context["city"] = rng.choice(["Jakarta", "Surabaya", "Medan"])
        if rng.random() < 0.8:
            context["device"] = rng.choice(["mobile", "desktop"])
        at = BASE_TIME + timedelta(seconds=rng.randrange(0, 2 * 86400, 60))  # whole minutes: ties
        events.append(
            make_event(
                event_id=f"log-{n}",
                visitor_id=f"v{rng.randrange(20)}",
                type=kind,
                item_id=extra.pop("item_id", f"p{rng.randrange(12)}"),
                timestamp=at.astimezone(rng.choice(ZONES)).isoformat(),
                context=context,
                **extra,
            )
        )
    return events


def append(store: Store, events: list[Event]) -> None:
    result = store.append_events(
        [PendingEvent(e.event_id, e.visitor_id, envelope(e, store.log_time())) for e in events]
    )
    assert result.accepted == len(events)


def archive_everything(store: Store) -> None:
    """What the aggregator and the archiver leave behind: every entry folded, then moved to the archive."""
    assert store.archive is not None
    for partition in range(store.partitions):
        entries = list(store.iter_hot(partition))
        if entries:
            store.put(Namespace.CURSOR, partition_log(partition), entries[-1].position.encode())
    archive_log(store, store.archive, store.log_time() + 5.0, 1.0, "test-archiver")


@pytest.fixture(params=["redis", "sqlite"])
def repository(request: pytest.FixtureRequest, settings_factory: Callable[..., Any]) -> Iterator[RecommendRepository]:
    if request.param == "redis":
        settings: CommonSettings = settings_factory(log_partitions=4)
    else:
        settings = settings_factory(redis_url=None)
    repository = RecommendRepository.open(settings)
    yield repository
    repository.close()


def test_training_reads_archive_and_hot_window_in_time_order_without_refusing_visitors(
    repository: RecommendRepository,
) -> None:
    store = repository.store
    assert store.archive is not None
    events = shuffled_history(600)
    append(store, events[:400])
    archive_everything(store)
    append(store, events[400:])
    assert store.archive.count() == 400
    assert sum(1 for p in range(store.partitions) for _ in store.iter_hot(p)) == 200
    for visitor in REFUSING:
        store.put(Namespace.CONSENT, visitor, Consent(given={"analytics": False}).to_bytes())
    store.put(Namespace.CONSENT, "v5", Consent(given={"analytics": True}).to_bytes())

    logged = list(repository.logged_events())
    assert len(logged) == 600
    stamps = [e.ts for e in logged]
    assert stamps != sorted(stamps)  # the log is in arrival order: training has to sort
    # What `load` did before: the whole log as a list, consent, then a stable sort by event time.
    expected = [
        LoggedEvent.of(e) for e in sorted((e for e in logged if e.visitor_id not in REFUSING), key=lambda e: e.ts)
    ]
    assert len({e.ts for e in expected}) < len(expected)  # ties keep their log order

    loaded, _ = Trainer(repository, TrainConfig()).load()

    assert list(loaded) == expected
    assert loaded.ts.tolist() == [e.ts for e in expected]
    assert {e.visitor_id for e in logged} & REFUSING == REFUSING
    assert not {e.visitor_id for e in loaded} & REFUSING
    # A shop whose default refuses analytics trains only on the visitors who said yes.
    strict, _ = Trainer(repository, TrainConfig(analytics_default="opt_in")).load()
    assert list(strict) == [e for e in expected if e.visitor_id == "v5"]


def test_event_columns_read_like_the_list_they_hold() -> None:
    events = [LoggedEvent.of(e) for e in shuffled_history(50, seed=8)]
    columns = EventColumns.of(events)
    in_order = sorted(events, key=lambda e: e.ts)
    assert len(columns) == 50
    assert columns[0] == in_order[0] and columns[-1] == in_order[-1]
    assert list(columns[10:20]) == in_order[10:20]
    assert list(columns) == in_order
    with pytest.raises(IndexError):
        columns[50]
    assert list(EventColumns.of([])) == []
