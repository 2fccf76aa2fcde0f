"""What every `selaras` command shares: the data-dir option, progress bars, tables and the console."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.terminal import console, err_console

if TYPE_CHECKING:
    from services.common.storage import Store
    from services.reports.pages import Report

__all__ = [
    "DataDir",
    "StageProgress",
    "console",
    "counting",
    "err_console",
    "metrics_table",
    "progress_bar",
    "publish_report",
]

T = TypeVar("T")
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="SELARAS_DATA_DIR", help="Where Selaras keeps its data.")]


def use_data_dir(data_dir: Path) -> None:
    """Point every setting read in this process at `data_dir` (services read SELARAS_DATA_DIR)."""
    os.environ["SELARAS_DATA_DIR"] = str(data_dir.resolve())


class StageProgress:
    """A Rich progress bar per named stage, fed with fractions 0..1. Stages run one after another: when a stage
    starts, the ones before it are done (a stage that never reported its end would otherwise stay at 0%), and
    `finish` completes the last one."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        task = self.tasks.get(stage)
        if task is None:
            self.finish()
            task = self.tasks[stage] = self.progress.add_task(stage, total=1.0)
        self.progress.update(task, completed=min(max(fraction, 0.0), 1.0))

    def finish(self) -> None:
        for task in self.tasks.values():
            self.progress.update(task, completed=1.0)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def counting(rows: Iterable[T], report: Callable[[int], None], every: int = 1000) -> Iterator[T]:
    n = 0
    for n, row in enumerate(rows, start=1):
        if n % every == 0:
            report(n)
        yield row
    report(n)


def publish_report(store: Store, report: Report, data_dir: Path) -> Path:
    """Keep an HTML report in the shared store (the recommend service shows it at /reports/<name>) and write a
    standalone copy to DATA_DIR/reports/<name>.html; say where both are."""
    from services.reports.pages import document
    from services.reports.store import ReportStore

    ReportStore(store).save(report)
    path = data_dir / "reports" / f"{report.name}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document(report))
    console.print(f"HTML report: /reports/{report.name} on the recommend service, and {path}", highlight=False)
    return path
