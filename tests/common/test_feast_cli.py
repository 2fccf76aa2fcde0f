"""The plain Feast CLI in feature_repo/ sees the registry the services write (it used to read an empty one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.common.settings import CommonSettings
from services.features.store import open_feature_store

ROOT = Path(__file__).resolve().parents[2]


def test_feast_cli_lists_the_feature_views_the_services_applied(tmp_path: Path) -> None:
    settings = CommonSettings(data_dir=tmp_path, environment="test", redis_url=None)
    applied = open_feature_store(settings)
    expected = sorted(view.name for view in applied.list_feature_views())
    assert expected, "the services applied no feature views"
    feast = Path(sys.executable).with_name("feast")
    listed = subprocess.run(
        [str(feast), "feature-views", "list"],
        cwd=ROOT / "feature_repo",
        env={**os.environ, "SELARAS_DATA_DIR": str(tmp_path.resolve())},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    for name in expected:
        assert name in listed.stdout, (name, listed.stdout)
