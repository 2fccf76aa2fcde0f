"""Declared customer traits on real Redis: 422 naming the field on ingest, `selaras import customers` (CSV and
JSON Lines) with line-numbered errors and no traceback, typed storage, export and erasure with the profile."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services.cli import app as cli
from services.profile.app import create_app
from services.profile.settings import ProfileSettings
from tests.conftest import REDIS_URL, wait_for
from tests.factories import make_event_dict

SCHEMA = json.dumps(
    {
        "traits": [
            {"name": "newbie", "type": "boolean"},
            {"name": "spend_12m", "type": "number"},
            {"name": "channel", "type": "category", "values": ["web", "phone", "multichannel"]},
            {"name": "signup_date", "type": "date"},
        ]
    }
)


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> ProfileSettings:
    made: ProfileSettings = settings_factory(ProfileSettings, aggregator_idle_s=0.01, traits=SCHEMA)
    return made


def traits_of(client: TestClient, visitor_id: str) -> dict[str, Any] | None:
    response = client.get(f"/v1/profiles/{visitor_id}/export")
    if response.status_code != 200 or not response.json().get("profile_state"):
        return None
    traits: dict[str, Any] = response.json()["profile_state"]["traits"]
    return traits


def run_cli(
    monkeypatch: pytest.MonkeyPatch, settings: ProfileSettings, *args: str, traits: str = SCHEMA
) -> tuple[int, str]:
    """The CLI as a user runs it: shared settings from the environment."""
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SELARAS_NAMESPACE", settings.namespace)
    monkeypatch.setenv("SELARAS_FEAST_PROJECT", settings.feast_project)
    monkeypatch.setenv("SELARAS_ENVIRONMENT", "test")
    monkeypatch.setenv("SELARAS_REDIS_TIMEOUT_S", "5")
    monkeypatch.setenv("SELARAS_TRAITS", traits)
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(settings.data_dir)], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def update(visitor_id: str, **properties: Any) -> dict[str, Any]:
    return make_event_dict(
        visitor_id=visitor_id, type="profile_update", item_id=None, price=None, properties=properties
    )


def test_ingest_refuses_undeclared_and_mistyped_traits_by_field_and_stores_good_ones_typed(
    settings: ProfileSettings,
) -> None:
    with TestClient(create_app(settings)) as client:
        refused = client.post(
            "/v1/events",
            json={"events": [update("ana", newbie=True), update("ana", tier="gold"), update("ana", spend_12m="lots")]},
        )
        assert refused.status_code == 422
        body = refused.json()
        assert body["error"] == "InvalidPayload"
        assert {(e["index"], e["field"]) for e in body["errors"]} == {
            (1, "properties.tier"),
            (2, "properties.spend_12m"),
        }
        assert traits_of(client, "ana") is None  # nothing of the batch was stored
        accepted = client.post(
            "/v1/events",
            json={"events": [update("ana", newbie=True, spend_12m=250_000, channel="web", first_name="Ana")]},
        )
        assert accepted.status_code == 202
        assert wait_for(lambda: traits_of(client, "ana") is not None)
        assert traits_of(client, "ana") == {"newbie": True, "spend_12m": 250_000, "channel": "web", "first_name": "Ana"}


def test_import_customers_csv_and_jsonl_then_export_and_erase(
    settings: ProfileSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_file = tmp_path / "customers.csv"
    csv_file.write_text(
        "visitor_id,newbie,spend_12m,channel,signup_date,first_name\n"
        "c-1,true,120.5,phone,2025-01-31,Budi\n"
        "c-2,0,,web,,\n"
    )
    code, output = run_cli(monkeypatch, settings, "import", "customers", str(csv_file))
    assert code == 0, output
    assert "2 customers imported" in output
    again_code, again = run_cli(monkeypatch, settings, "import", "customers", str(csv_file))
    assert again_code == 0 and "0 customers imported, 2 unchanged" in again

    jsonl_file = tmp_path / "customers.jsonl"
    jsonl_file.write_text(
        '{"visitor_id": "c-3", "spend_12m": 7, "newbie": null}\n'
        '{"visitor_id": "c-4", "channel": "fax"}\n'
        '{"visitor_id": "c-5", "newbie": false}\n'
    )
    code, output = run_cli(monkeypatch, settings, "import", "customers", str(jsonl_file))
    assert code == 2
    assert "line 2" in output and "channel" in output and "fax" in output
    assert "the 1 customers before line 2 were imported" in output

    with TestClient(create_app(settings)) as client:
        assert wait_for(lambda: traits_of(client, "c-3") is not None)
        assert traits_of(client, "c-1") == {
            "newbie": True,
            "spend_12m": 120.5,
            "channel": "phone",
            "signup_date": "2025-01-31",
            "first_name": "Budi",
        }
        assert traits_of(client, "c-2") == {"newbie": False, "channel": "web"}  # empty cells leave traits alone
        assert traits_of(client, "c-3") == {"spend_12m": 7, "newbie": None}
        assert traits_of(client, "c-5") is None  # after the bad line: not imported
        receipt = client.delete("/v1/profiles/c-1")
        assert receipt.status_code == 200 and receipt.json()["visitor_state"] == 1
        assert traits_of(client, "c-1") is None


@pytest.mark.parametrize(
    ("content", "suffix", "needle"),
    [
        ("visitor_id,newbie,tier\nc-1,true,gold\n", "csv", "line 1: tier: tier is not a declared trait"),
        ("customer,newbie\nc-1,true\n", "csv", "line 1: (header): the header needs a visitor_id column"),
        ("visitor_id,newbie\nc-1,true\nc-2,maybe\n", "csv", "line 3: newbie: newbie is true or false"),
        ("visitor_id,spend_12m\nc-1,12,13\n", "csv", "line 2: (line): 3 cells for 2 columns"),
        ('{"visitor_id": "c-1"}\n{not json\n', "jsonl", "line 2: (line): not JSON"),
        ('{"newbie": true}\n', "jsonl", "line 1: visitor_id"),
        ('{"visitor_id": "c-1", "signup_date": "yesterday"}\n', "jsonl", "line 1: signup_date"),
        ('{"visitor_id": "c-1"}\n', "txt", "expected .csv or .jsonl"),
    ],
)
def test_bad_customer_files_name_the_line_and_field(
    settings: ProfileSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str,
    suffix: str,
    needle: str,
) -> None:
    path = tmp_path / f"customers.{suffix}"
    path.write_text(content)
    code, output = run_cli(monkeypatch, settings, "import", "customers", str(path))
    assert code == 2
    assert needle in " ".join(output.split()), output


def test_import_customers_needs_a_declared_schema(
    settings: ProfileSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "customers.csv"
    path.write_text("visitor_id,newbie\nc-1,true\n")
    code, output = run_cli(monkeypatch, settings, "import", "customers", str(path), traits="")
    assert code == 2 and "SELARAS_TRAITS" in output


def test_import_events_names_the_line_of_a_refused_trait(
    settings: ProfileSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.jsonl"
    rows = [update("e-1", newbie=True), update("e-1", channel="fax")]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    code, output = run_cli(monkeypatch, settings, "import", "events", str(path))
    assert code == 2
    assert "line 2: properties.channel: channel must be one of web, phone, multichannel" in " ".join(output.split())
