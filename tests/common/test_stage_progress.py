"""Stage progress bars end at 100%: a stage that never reported its end is completed when the next one starts,
and `finish` completes the last (the first-run output showed finished stages stuck at 0%)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from services.cli.common import StageProgress


def test_every_stage_ends_complete() -> None:
    progress = Progress(console=Console(file=io.StringIO()))
    stages = StageProgress(progress)
    stages("reading the event log", 0.0)
    stages("training LightGBM", 0.4)
    assert [t.completed for t in progress.tasks] == [1.0, 0.4]
    stages("training LightGBM", 0.7)
    stages.finish()
    assert [t.completed for t in progress.tasks] == [1.0, 1.0] and all(t.finished for t in progress.tasks)
