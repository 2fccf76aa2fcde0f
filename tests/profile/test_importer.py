"""`selaras import events|catalog` on real Redis and Feast: line numbers, --skip-invalid, gzip, duplicates,
and features equal to live ingestion of the same events (point in time)."""

from __future__ import annotations

import gzip
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services.cli import app as cli
from services.common.clock import FixedClock
from services.common.events import Event, EventType
from services.common.storage import Namespace
from services.demo.files import write_jsonl
from services.demo.shop import generate_shop
from services.demo.simulator import Simulator
from services.features import schema as F
from services.profile.app import build_state, create_app
from services.profile.importer import InvalidInput, import_catalog, import_events
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from tests.conftest import REDIS_URL, clean_namespace, unique_name
from tests.factories import make_event_dict

END = datetime(2026, 3, 1, tzinfo=UTC)


@dataclass
class Imported:
    """The same simulated history, imported with the CLI (A) and posted to a live profile service (B)."""

    directory: Path
    events: list[Event]
    events_file: Path
    catalog_file: Path
    cli: ProfileSettings
    live: ProfileSettings
    import_output: str


def _settings(directory: Path) -> ProfileSettings:
    namespace = unique_name("imp")
    return ProfileSettings(
        data_dir=directory,
        redis_url=REDIS_URL,
        namespace=namespace,
        feast_project=namespace,
        environment="test",
        aggregator_idle_s=0.005,
        redis_timeout_s=5.0,
    )


def _env(monkeypatch: pytest.MonkeyPatch, settings: ProfileSettings) -> None:
    """The CLI reads the shared settings from the environment, like a user's shell."""
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SELARAS_NAMESPACE", settings.namespace)
    monkeypatch.setenv("SELARAS_FEAST_PROJECT", settings.feast_project)
    monkeypatch.setenv("SELARAS_ENVIRONMENT", "test")
    monkeypatch.setenv("SELARAS_REDIS_TIMEOUT_S", "5")
    monkeypatch.setenv("SELARAS_DATA_DIR", str(settings.data_dir))


def run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def wait_until_folded(repository: ProfileRepository, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not repository.unfolded_partitions():
            return
        time.sleep(0.05)
    raise AssertionError("the aggregator did not catch up")


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    directory = tmp_path_factory.mktemp("importer")
    shop = generate_shop(seed=5, now=END)
    simulator = Simulator(shop, n_visitors=12, seed=5, start=END - timedelta(days=3))
    events = list(simulator.history(3))
    events_file = directory / "events.jsonl.gz"
    catalog_file = directory / "catalog.jsonl"
    write_jsonl(events, events_file)
    write_jsonl(shop.all_items(), catalog_file)
    cli_settings, live_settings = _settings(directory / "cli"), _settings(directory / "live")
    monkeypatch = pytest.MonkeyPatch()
    try:
        _env(monkeypatch, cli_settings)
        code, output = run_cli(["import", "catalog", str(catalog_file), "--data-dir", str(cli_settings.data_dir)])
        assert code == 0, output
        code, output = run_cli(["import", "events", str(events_file), "--data-dir", str(cli_settings.data_dir)])
        assert code == 0, output
        monkeypatch.undo()

        # The live path: the profile service's API in batches of 1,000 and its own aggregator thread.
        # Live traffic arriving as it happens: the service's clock is at the newest event.
        with TestClient(create_app(live_settings, FixedClock(max(e.ts for e in events)))) as client:
            state = client.app.state.profile  # type: ignore[attr-defined]
            import_catalog(catalog_file, state.repository.upsert_catalog)
            state.aggregator.refresh_catalog(force=True)
            payload = [e.model_dump(mode="json", exclude_none=True) for e in events]
            for start in range(0, len(payload), 1000):
                response = client.post("/v1/events", json={"events": payload[start : start + 1000]})
                assert response.status_code == 202, response.text
            wait_until_folded(state.repository)
        yield Imported(directory, events, events_file, catalog_file, cli_settings, live_settings, output)
    finally:
        monkeypatch.undo()
        for settings in (cli_settings, live_settings):
            clean_namespace(REDIS_URL, settings.namespace)
        shutil.rmtree(directory, ignore_errors=True)


def offline_visitor_rows(settings: ProfileSettings) -> pd.DataFrame:
    frame = pd.read_parquet(settings.offline_dir / F.VISITOR_VIEW)
    frame = frame.sort_values([F.VISITOR_KEY, F.TIMESTAMP_FIELD, "event_count"]).reset_index(drop=True)
    return frame[[F.VISITOR_KEY, F.TIMESTAMP_FIELD, *F.VISITOR_FEATURES]]


def test_imported_features_equal_live_ingestion(imported: Imported) -> None:
    cli_repo = ProfileRepository.open(imported.cli)
    live_repo = ProfileRepository.open(imported.live)
    try:
        visitors = sorted({e.visitor_id for e in imported.events})
        items = sorted({e.item_id for e in imported.events if e.item_id})
        assert "events imported" in imported.import_output and f"{len(imported.events):,}" in imported.import_output
        # Online rows, visitor and item, as the recommend service reads them.
        for visitor in visitors:
            assert cli_repo.online_visitor(visitor) == live_repo.online_visitor(visitor), visitor
        from services.features.store import online_rows

        assert online_rows(cli_repo.feature_store, F.ITEM_VIEW, items) == online_rows(
            live_repo.feature_store, F.ITEM_VIEW, items
        )
        # The point-in-time history training reads: one row per folded event, identical.
        pd.testing.assert_frame_equal(offline_visitor_rows(imported.cli), offline_visitor_rows(imported.live))
        # Candidate indexes (co-visitation, trending) and visitor state.
        for namespace in (Namespace.COVISITATION, Namespace.POPULARITY):
            assert dict(cli_repo.store.scan(namespace)) == dict(live_repo.store.scan(namespace)), namespace
        states = cli_repo.visitor_states(visitors)
        live_states = live_repo.visitor_states(visitors)
        assert {v: asdict(s) | {"applied_position": ""} for v, s in states.items()} == {
            v: asdict(s) | {"applied_position": ""} for v, s in live_states.items()
        }
        assert len(states) == len(visitors)
    finally:
        cli_repo.close()
        live_repo.close()


def test_an_event_sees_only_what_happened_before_it(imported: Imported) -> None:
    views: dict[str, list[float]] = {}
    for event in imported.events:
        if event.type is EventType.PRODUCT_VIEW:
            views.setdefault(event.visitor_id, []).append(event.ts)
    visitor, times = max(views.items(), key=lambda kv: len(kv[1]))
    assert len(times) >= 5
    repository = ProfileRepository.open(imported.cli)
    try:
        # Just before the k-th view, the visitor has exactly k views; just after it, k + 1.
        at = [t - 0.001 for t in times] + [times[-1] + 0.001]
        entity_df = pd.DataFrame(
            {F.VISITOR_KEY: [visitor] * len(at), F.TIMESTAMP_FIELD: [datetime.fromtimestamp(t, UTC) for t in at]}
        )
        frame = repository.feature_store.get_historical_features(
            entity_df=entity_df, features=[f"{F.VISITOR_VIEW}:views_30d"]
        ).to_df()
        frame = frame.sort_values(F.TIMESTAMP_FIELD)
        seen = [0 if pd.isna(v) else int(v) for v in frame["views_30d"]]
        assert seen == list(range(len(times) + 1))
    finally:
        repository.close()


def test_reimport_counts_duplicates_and_changes_nothing(imported: Imported, monkeypatch: pytest.MonkeyPatch) -> None:
    repository = ProfileRepository.open(imported.cli)
    try:
        visitor = imported.events[-1].visitor_id
        before = repository.online_visitor(visitor)
        log_length = repository.store.log_length()
        _env(monkeypatch, imported.cli)
        code, output = run_cli(
            ["import", "events", str(imported.events_file), "--data-dir", str(imported.cli.data_dir)]
        )
        assert code == 0, output
        assert "0 events imported" in output
        assert f"{len(imported.events):,} duplicates" in output
        assert repository.store.log_length() == log_length
        assert repository.online_visitor(visitor) == before
    finally:
        repository.close()


def write_lines(path: Path, lines: list[bytes]) -> Path:
    raw = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def event_line(**overrides: Any) -> bytes:
    return orjson.dumps(make_event_dict(**overrides))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_invalid_lines_are_reported_by_number(imported: Imported, tmp_path: Path, suffix: str) -> None:
    lines = [
        event_line(visitor_id="inv-a"),
        event_line(visitor_id="inv-a"),
        b'{"event_id": "broken",',  # line 3: not JSON
        b"",  # blank lines are skipped but counted
        event_line(visitor_id="inv-a", item_id=None),  # line 5: a product view needs an item
        b'{"event_id": "x", "visitor_id": "v", "type": "page_view", "timestamp": "2026-01-01T00:00:00Z", '
        b'"query": "caf\xe9"}',  # line 6: not UTF-8
        event_line(visitor_id="inv-a", type="teleport"),  # line 7: unknown type
        event_line(visitor_id="inv-b"),
    ]
    path = write_lines(tmp_path / f"events{suffix}", lines)
    state = build_state(imported.cli)
    try:
        with pytest.raises(InvalidInput) as stopped:
            import_events(path, state.ingest, state.aggregator)
        assert stopped.value.invalid.line == 3
        assert "not JSON" in str(stopped.value)
        assert stopped.value.report is not None and stopped.value.report.accepted == 2  # the lines before it

        report = import_events(path, state.ingest, state.aggregator, skip_invalid=True)
        assert [invalid.line for invalid in report.invalid] == [3, 5, 6, 7]
        assert report.invalid_count == 4
        assert (report.accepted, report.duplicates) == (1, 2)  # lines 1-2 came in with the first attempt
        fields = {invalid.line: invalid.errors[0]["field"] for invalid in report.invalid}
        assert "item_id is required" in report.invalid[1].errors[0]["message"]
        assert fields[7] == "type"
    finally:
        state.repository.close()


def test_cli_prints_line_numbers_and_stops_without_skip_invalid(
    imported: Imported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_lines(
        tmp_path / "events.jsonl",
        [event_line(visitor_id="cli-a"), event_line(visitor_id="cli-a", type="teleport"), event_line()],
    )
    _env(monkeypatch, imported.cli)
    code, output = run_cli(["import", "events", str(path), "--data-dir", str(imported.cli.data_dir)])
    assert code == 2
    assert "line 2" in output and "type" in output
    assert "1 events before line 2 were imported" in " ".join(output.split())
    code, output = run_cli(["import", "events", str(path), "--data-dir", str(imported.cli.data_dir), "--skip-invalid"])
    assert code == 0, output
    assert "1 invalid lines" in output and "line 2: type" in output
    assert "1 events imported, 1 duplicates" in output


def test_truncated_gzip_stops_with_the_line_reached(imported: Imported, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl.gz"
    raw = gzip.compress(b"\n".join(event_line(visitor_id="trunc") for _ in range(200)) + b"\n")
    path.write_bytes(raw[: len(raw) // 2])
    state = build_state(imported.cli)
    try:
        with pytest.raises(InvalidInput) as stopped:
            import_events(path, state.ingest, state.aggregator, skip_invalid=True)
        assert stopped.value.invalid.errors[0]["field"] == "(file)"
        assert "truncated or corrupt" in str(stopped.value)
        report = stopped.value.report
        assert report is not None and 0 < report.accepted == stopped.value.invalid.line - 1
    finally:
        state.repository.close()


def test_catalog_import_reports_lines_and_reads_gzip(imported: Imported, tmp_path: Path) -> None:
    good = {"item_id": "imp-1", "title": "Kaos", "price": 99_000, "category": "fashion-pria"}
    lines = [
        orjson.dumps(good),
        orjson.dumps({"item_id": "imp-2", "title": "Tanpa harga"}),  # line 2: products need a price
        orjson.dumps({**good, "item_id": "imp-3", "kind": "banner"}),
    ]
    upserted: list[str] = []
    path = write_lines(tmp_path / "catalog.jsonl.gz", lines)
    with pytest.raises(InvalidInput) as stopped:
        import_catalog(path, lambda items: upserted.extend(i.item_id for i in items))
    assert stopped.value.invalid.line == 2 and "price" in str(stopped.value)
    assert upserted == ["imp-1"]
    report = import_catalog(path, lambda items: upserted.extend(i.item_id for i in items), skip_invalid=True)
    assert (report.accepted, report.invalid_count, [i.line for i in report.invalid]) == (2, 1, [2])
    assert upserted == ["imp-1", "imp-1", "imp-3"]


def test_events_out_of_time_order_stop_the_import_and_nothing_is_folded_out_of_order(
    imported: Imported, tmp_path: Path
) -> None:
    later, earlier = END - timedelta(hours=1), END - timedelta(hours=2)
    path = write_lines(
        tmp_path / "events.jsonl",
        [
            event_line(visitor_id="ord-a", timestamp=earlier.isoformat()),
            event_line(visitor_id="ord-a", timestamp=later.isoformat()),
            event_line(visitor_id="ord-a", timestamp=earlier.isoformat()),  # line 3: older than line 2
            event_line(visitor_id="ord-a", timestamp=later.isoformat()),
        ],
    )
    state = build_state(imported.cli)
    try:
        for skip_invalid in (False, True):  # skipping invalid lines does not skip the order check
            with pytest.raises(InvalidInput) as stopped:
                import_events(path, state.ingest, state.aggregator, skip_invalid=skip_invalid)
            assert stopped.value.invalid.line == 3
            assert "must be sorted by timestamp" in str(stopped.value)
        folded = state.repository.visitor_states(["ord-a"])["ord-a"]
        assert folded.event_count == 2  # the two lines before it, in order
    finally:
        state.repository.close()
