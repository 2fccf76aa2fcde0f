"""`selaras --html FILE <command>` saves what the command printed as an HTML page."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from services.cli import app as cli
from services.common.terminal import console


def test_html_copy_of_a_commands_output(tmp_path: Path) -> None:
    assert not console.record
    page = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["--html", str(page), "keys", "new", "--name", "reporting", "--scopes", "admin"])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "reporting:admin:" in html
    assert "reporting:admin:" in result.output  # the terminal still gets it
    assert not console.record  # recording ends with the command


def test_without_html_nothing_is_recorded() -> None:
    result = CliRunner().invoke(cli, ["keys", "new", "--name", "plain", "--scopes", "admin"])
    assert result.exit_code == 0 and not console.record
