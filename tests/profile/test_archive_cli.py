"""`selaras archive` on the embedded store: archives what is folded, trims the log, reports per partition."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

from services.cli import app as cli_app
from services.features.aggregations import SegmentRules
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from tests.factories import BASE_TIME
from tests.profile.test_privacy import history


def test_archive_command_archives_the_folded_log(
    settings_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings, redis_url=None)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("SELARAS_DATA_DIR", str(settings.data_dir))
    repository = ProfileRepository.open(settings)
    try:
        events = history("a", BASE_TIME, days=3)
        IngestService(repository).ingest(events)
        aggregator = Aggregator(repository, SegmentRules(), settings.consent_defaults())
        aggregator.run_once(5)  # 5 of 12 folded
        runner = CliRunner()
        kept = runner.invoke(cli_app, ["archive", "--data-dir", str(settings.data_dir)])
        assert kept.exit_code == 0, kept.output
        assert "12 events stay in the hot window, 0 archived" in " ".join(kept.output.split())
        result = runner.invoke(cli_app, ["archive", "--window-days", "0", "--data-dir", str(settings.data_dir)])
        assert result.exit_code == 0, result.output
        assert "7 events stay in the hot window, 5 archived" in " ".join(result.output.split())
        assert repository.store.log_length() == 7 and len(list(repository.store.iter_log())) == 12
    finally:
        repository.close()
