"""`selaras archive` and `selaras admin repartition`: the event log's housekeeping (docs/data-path.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from services.cli.common import DataDir, console, progress_bar, use_data_dir


def archive(
    data_dir: DataDir = Path("data"),
    window_days: Annotated[
        float | None,
        typer.Option(help="Archive folded events older than this (default SELARAS_HOT_WINDOW_DAYS).", min=0),
    ] = None,
) -> None:
    """Archive folded events older than the hot window to the offline store and trim them from the log (the
    aggregator does it every PROFILE_ARCHIVE_INTERVAL_S; safe to run next to it)."""
    use_data_dir(data_dir)
    from services.common.storage import open_store
    from services.common.storage.archiver import archive_log
    from services.profile.aggregator.lease import holder_name
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(data_dir=data_dir)
    store = open_store(settings)
    try:
        assert store.archive is not None
        window_s = (window_days if window_days is not None else settings.hot_window_days) * 86400.0
        with progress_bar() as bar:
            tasks = {
                p: bar.add_task(f"partition {p}", total=max(1, store.log_length(p))) for p in range(store.partitions)
            }

            def progress(partition: int, archived: int, trimmed: int) -> None:
                bar.update(tasks[partition], completed=trimmed)

            report = archive_log(store, store.archive, store.log_time(), window_s, holder_name(), progress=progress)
            for task in tasks.values():
                bar.update(task, completed=bar.tasks[task].total)
        table = Table(title=f"archived to {store.archive.root} (events acknowledged before the hot window)")
        for column in ("partition", "archived", "trimmed from the log", "files", "note"):
            table.add_column(column, justify="left" if column == "note" else "right")
        for part in report.partitions:
            counts = (f"{part.archived:,}", f"{part.trimmed:,}", str(part.files))
            table.add_row(str(part.partition), *counts, part.skipped or "")
        console.print(table)
        console.print(f"{store.log_length():,} events stay in the hot window, {store.archive.count():,} archived")
    finally:
        store.close()


def repartition(
    partitions: Annotated[int, typer.Option("--partitions", help="The new number of log partitions.", min=1, max=64)],
    data_dir: DataDir = Path("data"),
    current: Annotated[
        int | None,
        typer.Option("--from", help="The current count (default: the stored one, else SELARAS_LOG_PARTITIONS)."),
    ] = None,
) -> None:
    """Change the number of log partitions: stop every aggregator first (PROFILE_AGGREGATOR_ENABLED=false on the
    API); the tool refuses while any holds a lease, folds what is left, archives the log, moves the idempotency
    keys, rewrites the archive and stores the new count. Then start everything with SELARAS_LOG_PARTITIONS set
    to the new count (processes with another count refuse to start)."""
    use_data_dir(data_dir)
    from services.common.storage import RedisStore, open_store
    from services.common.storage.repartition import RepartitionRefused, stored_partitions
    from services.common.storage.repartition import repartition as move_partitions
    from services.profile.app import build_state
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(data_dir=data_dir)
    if not settings.redis_url:
        console.print("[red]the embedded store keeps one log partition: nothing to repartition[/]")
        raise typer.Exit(2)
    probe = open_store(settings)
    try:
        old_count = current or stored_partitions(probe) or settings.log_partitions
    finally:
        probe.close()
    if old_count == partitions:
        console.print(f"the log already has {partitions} partitions")
        return
    # The aggregator of the old count drains the log, under the tool's leases (same holder name).
    state = build_state(settings.model_copy(update={"log_partitions": old_count}))
    old, aggregator = state.repository.store, state.aggregator
    new = open_store(settings.model_copy(update={"log_partitions": partitions}))
    assert isinstance(old, RedisStore) and isinstance(new, RedisStore)

    def drain() -> None:
        while True:
            if not aggregator.run_once(settings.aggregator_batch).held:
                raise RepartitionRefused("could not hold the partitions to fold what is left")
            if not state.repository.unfolded_partitions():
                break
        state.repository.leave_aggregators(aggregator.holder)

    def say(step: str) -> None:
        console.print(f"- {step}")

    try:
        report: Any = move_partitions(old, new, aggregator.holder, drain, say)
    except RepartitionRefused as exc:
        console.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(1) from exc
    finally:
        new.close()
        state.repository.close()
    console.print(
        f"the log now has {report.new} partitions (was {report.old}): {report.archived:,} hot events archived, "
        f"{report.keys_moved:,} idempotency keys moved, {report.archive_rows:,} archived events re-keyed. "
        f"Start the services with SELARAS_LOG_PARTITIONS={report.new}."
    )


def index_offline(data_dir: DataDir = Path("data")) -> None:
    """Index the offline history's part files by visitor now, instead of in the first export or erasure after
    an upgrade (which would read every file once). Safe while the services run; a second run reads nothing."""
    use_data_dir(data_dir)
    from services.common.settings import CommonSettings
    from services.features import schema as F
    from services.features.store import offline_index

    settings = CommonSettings(data_dir=data_dir)
    index = offline_index(settings.offline_dir, F.VISITOR_VIEW)
    assert index is not None  # the visitor view keeps one
    read = index.catch_up()
    console.print(f"{read:,} part files of {F.VISITOR_VIEW} indexed (files already indexed are not read again)")


def compact(
    data_dir: DataDir = Path("data"),
    target_rows: Annotated[
        int | None,
        typer.Option(help="Rows per merged file (default PROFILE_COMPACT_TARGET_ROWS).", min=2),
    ] = None,
) -> None:
    """Merge the offline feature history's small part files (one per folded batch) into larger ones: the
    aggregator does it with every archive run; safe to run next to it, the services and erasures."""
    use_data_dir(data_dir)
    from services.profile.compaction import compact_history
    from services.profile.repository import ProfileRepository
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(data_dir=data_dir)
    repository = ProfileRepository.open(settings)
    try:
        with console.status("merging part files ..."):
            reports = compact_history(repository, settings.offline_dir, target_rows or settings.compact_target_rows)
    finally:
        repository.close()
    table = Table(title=f"offline history in {settings.offline_dir}")
    for column in ("view", "files before", "merged", "into", "rows moved", "files after", "note"):
        table.add_column(column, justify="left" if column in ("view", "note") else "right")
    for report in reports:
        counts = (report.files_before, report.files_merged, report.files_written, report.rows, report.files_after)
        note = "readers held the read lock: the rest next run" if report.stopped_busy else ""
        table.add_row(report.view, *(f"{n:,}" for n in counts), note)
    console.print(table)


def index_recommendations(data_dir: DataDir = Path("data")) -> None:
    """Index the stored recommendation records by visitor (once after an upgrade): erasure and export find a
    visitor's records through that index, and records written by an earlier version are not in it. Reads every
    record once (on Redis a SCAN of the database); safe while the services run, and to run again."""
    use_data_dir(data_dir)
    from services.common.storage import open_store
    from services.profile.privacy.repository import index_recommendation_records
    from services.recommend.settings import RecommendSettings

    settings = RecommendSettings(data_dir=data_dir)
    store = open_store(settings)
    try:
        with console.status("reading the recommendation records ..."):
            indexed = index_recommendation_records(store, settings.recommendation_ttl_s)
    finally:
        store.close()
    console.print(f"{indexed:,} recommendation records indexed by visitor")
