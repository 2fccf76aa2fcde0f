"""The one Rich console every `selaras` command prints to, so `selaras --html FILE <command>` can save what
any command printed (tables, summaries) as an HTML page to share, without a second rendering path."""

from __future__ import annotations

from rich.console import Console

console = Console()
# Summaries of commands whose standard output is data (CSV exports): they go to standard error.
err_console = Console(stderr=True)


def record_to_html() -> None:
    """From now on keep what is printed, for `save_html`."""
    console.record = True


def save_html(path: str) -> None:
    """Write what was recorded and stop recording (a long-lived process must not keep every line)."""
    console.save_html(path, clear=True)
    console.record = False
