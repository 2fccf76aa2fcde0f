"""The report store on each backend of the shared store: a saved report reads back unchanged, a second run of
the same command replaces it, and the list is newest first."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.common.settings import CommonSettings
from services.common.storage import open_store
from services.reports.pages import Report
from services.reports.store import ReportStore
from tests.conftest import REDIS_URL


@pytest.fixture(params=["redis", "sqlite"])
def reports(request: pytest.FixtureRequest, settings_factory: Callable[..., Any]) -> Iterator[ReportStore]:
    settings: CommonSettings = settings_factory(redis_url=REDIS_URL if request.param == "redis" else None)
    store = open_store(settings)
    try:
        yield ReportStore(store)
    finally:
        store.close()


def report(name: str, created_at: str, summary: str = "s") -> Report:
    return Report(name, "ranking", f"Title {name}", created_at, summary, f"<h2>{name}</h2><svg></svg>")


def test_a_saved_report_reads_back_unchanged(reports: ReportStore) -> None:
    saved = report("ranking", "2026-11-20T10:00:00+00:00")
    reports.save(saved)
    assert reports.get("ranking") == saved
    assert reports.get("missing") is None


def test_saving_the_same_name_again_replaces_the_report(reports: ReportStore) -> None:
    reports.save(report("ranking", "2026-11-20T10:00:00+00:00", summary="first run"))
    reports.save(report("ranking", "2026-11-21T10:00:00+00:00", summary="second run"))
    found = reports.get("ranking")
    assert found is not None and found.summary == "second run"
    assert [r.name for r in reports.all()] == ["ranking"]


def test_every_report_is_listed_newest_first(reports: ReportStore) -> None:
    assert reports.all() == []
    reports.save(report("middle", "2026-11-20T10:00:00+00:00"))
    reports.save(report("newest", "2026-11-22T10:00:00+00:00"))
    reports.save(report("oldest", "2026-11-18T10:00:00+00:00"))
    assert [r.name for r in reports.all()] == ["newest", "middle", "oldest"]
