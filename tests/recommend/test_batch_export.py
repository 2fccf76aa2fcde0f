"""`selaras export recommendations`: a personal list per visitor of an audience file, through the served
pipeline, as CSV; nothing logged unless asked; clear errors for a bad visitor file."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from typer.testing import CliRunner

from services.cli import app as cli
from services.common.storage import Namespace, open_store
from tests.conftest import SessionWorld


def env_of(world: SessionWorld) -> dict[str, str]:
    return {
        "REDIS_URL": world.settings.redis_url or "",
        "SELARAS_NAMESPACE": world.settings.namespace,
        "SELARAS_FEAST_PROJECT": world.settings.feast_project,
        "SELARAS_ENVIRONMENT": "test",
    }


def test_every_visitor_gets_a_personal_list(world: SessionWorld, tmp_path: Path) -> None:
    store = open_store(world.settings)
    try:
        visitor_ids = sorted(key for key, _ in store.scan(Namespace.VISITOR_STATE))[:5]
        catalog = {key for key, _ in store.scan(Namespace.CATALOG)}
        log_before = store.log_length()
    finally:
        store.close()
    audience = tmp_path / "audience.csv"
    audience.write_text("visitor_id,persona_id\n" + "".join(f"{v},1\n" for v in [*visitor_ids, visitor_ids[0]]))
    out = tmp_path / "recs.csv"
    args = ["export", "recommendations", str(audience), "--data-dir", str(world.settings.data_dir)]
    result = CliRunner().invoke(cli, [*args, "--count", "4", "--out", str(out)], env=env_of(world))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 5 * 4  # the repeated visitor is ranked once
    by_visitor: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_visitor.setdefault(row["visitor_id"], []).append(row)
    assert sorted(by_visitor) == visitor_ids
    for visitor_rows in by_visitor.values():
        assert len({r["recommendation_id"] for r in visitor_rows}) == 1
        items = [r["item_id"] for r in visitor_rows]
        assert len(set(items)) == 4 and set(items) <= catalog
    assert len({tuple(r["item_id"] for r in rs) for rs in by_visitor.values()}) > 1  # personal, not one list
    store = open_store(world.settings)
    try:
        assert store.log_length() == log_before  # nothing logged without --log-impressions
    finally:
        store.close()


def test_a_visitor_file_without_the_column_is_refused(world: SessionWorld, tmp_path: Path) -> None:
    audience = tmp_path / "emails.csv"
    audience.write_text("email\nsomeone@example.com\n")
    result = CliRunner().invoke(
        cli,
        ["export", "recommendations", str(audience), "--data-dir", str(world.settings.data_dir)],
        env=env_of(world),
    )
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "visitor_id column" in output and "line 1" in output
    assert not output.startswith("visitor_id,")  # refused before any row was written
