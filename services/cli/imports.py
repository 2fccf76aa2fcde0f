"""`selaras import events|customers|catalog`: a shop's history, CRM attributes and catalog, JSON Lines or CSV."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from services.cli.common import (
    DataDir,
    console,
    progress_bar,
    use_data_dir,
)

if TYPE_CHECKING:  # the CLI imports the heavy modules inside each command, so --help stays fast
    from services.profile.importer import ImportReport


def import_events_command(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="Events: JSON Lines (.jsonl) or CSV with a header (.csv), optionally .gz"
        ),
    ],
    data_dir: DataDir = Path("data"),
    skip_invalid: Annotated[bool, typer.Option(help="Skip invalid lines (reported) instead of stopping.")] = False,
    batch_size: int = 5000,
) -> None:
    """Import events through the ingest path and fold them into features (point in time, file order)."""
    use_data_dir(data_dir)
    from services.common.clock import DataClock
    from services.common.gc_tuning import tune_for_folding
    from services.profile.app import build_state
    from services.profile.importer import InvalidInput, import_events
    from services.profile.settings import ProfileSettings

    # The profile service's own state (segment rules, consent defaults, personas, observers from the same
    # settings), so imported features are the ones live ingestion would have built.
    # The fold follows the file's own time (a DataClock): windows and decay of a history imported today are
    # those of its own days, not of today's wall clock.
    state = build_state(ProfileSettings(data_dir=data_dir), aggregator_clock=DataClock())
    repository = state.repository
    state.aggregator.refresh_catalog(force=True)
    if not state.aggregator.catalog:
        console.print(
            "[yellow]the catalog has no products: import it first, or category and brand features stay empty[/]"
        )
    size = file.stat().st_size
    tune_for_folding()
    started = time.perf_counter()
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"importing {file.name}", total=None)
            report = import_events(
                file,
                state.ingest,
                state.aggregator,
                batch_size,
                skip_invalid,
                progress=lambda line: bar.update(task, description=f"importing {file.name}: line {line:,}"),
            )
    except InvalidInput as exc:
        imported = exc.report.accepted if exc.report else 0
        console.print(f"[red]invalid input:[/] {exc}")
        console.print(
            f"the {imported:,} events before line {exc.invalid.line:,} were imported, nothing after it; fix the "
            "file and re-run (events already imported are recognised by event_id), or use --skip-invalid"
        )
        raise typer.Exit(2) from exc
    finally:
        state.aggregator.stop()  # releases the log's lease for the live aggregator
        repository.close()
    seconds = time.perf_counter() - started
    rate = report.lines / max(seconds, 1e-9)
    console.print(
        f"{report.accepted:,} events imported, {report.duplicates:,} duplicates, "
        f"{report.invalid_count:,} invalid lines in {seconds:.1f} s ({rate:,.0f} lines/s, {size / 1e6:.1f} MB)"
    )
    print_invalid_lines(report)
    if report.folded_by_live_aggregator:
        console.print("a running aggregator held the log: it folded the imported events on its own clock")


def import_customers_command(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="CSV with a header, or JSON Lines (.gz too): visitor_id + trait columns"
        ),
    ],
    data_dir: DataDir = Path("data"),
    at: Annotated[
        str | None, typer.Option(help="When the attributes were true (ISO time with a zone; default: now)")
    ] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Skip invalid lines (reported) instead of stopping.")] = False,
    batch_size: int = 5000,
) -> None:
    """Import customer attributes (the traits declared in SELARAS_TRAITS) as profile updates: checked, folded,
    read by the message model, exported and erased with the profile."""
    use_data_dir(data_dir)
    from datetime import datetime

    from services.profile.app import build_state
    from services.profile.customers import import_customers
    from services.profile.importer import InvalidInput
    from services.profile.settings import ProfileSettings

    try:
        when = datetime.fromisoformat(at) if at else None
    except ValueError as exc:
        raise typer.BadParameter(f"{at!r} is not an ISO time") from exc
    if when is not None and when.tzinfo is None:
        raise typer.BadParameter(f"{at!r} needs a time zone, e.g. 2026-11-20T00:00:00+07:00")
    try:
        settings = ProfileSettings(data_dir=data_dir)
    except ValueError as exc:  # a bad SELARAS_TRAITS names what is wrong
        console.print(f"[red]invalid settings:[/] {exc}")
        raise typer.Exit(2) from exc
    state = build_state(settings)
    started = time.perf_counter()
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"importing {file.name}", total=None)
            report = import_customers(
                file,
                state.ingest,
                state.aggregator,
                when,
                batch_size,
                skip_invalid,
                progress=lambda line: bar.update(task, description=f"importing {file.name}: line {line:,}"),
            )
    except InvalidInput as exc:
        imported = exc.report.accepted if exc.report else 0
        console.print(f"[red]invalid input:[/] {exc}")
        if exc.invalid.line > 1:
            console.print(
                f"the {imported:,} customers before line {exc.invalid.line:,} were imported, nothing after it; fix "
                "the file and re-run (lines already imported are recognised), or use --skip-invalid"
            )
        raise typer.Exit(2) from exc
    finally:
        state.aggregator.stop()
        state.repository.close()
    seconds = time.perf_counter() - started
    console.print(
        f"{report.accepted:,} customers imported, {report.duplicates:,} unchanged, "
        f"{report.invalid_count:,} invalid lines in {seconds:.1f} s"
    )
    print_invalid_lines(report)


def import_catalog_command(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="Catalog items: JSON Lines or CSV with a header, optionally .gz"
        ),
    ],
    data_dir: DataDir = Path("data"),
    skip_invalid: bool = False,
) -> None:
    """Import catalog items (products, banners, CTAs, message templates)."""
    use_data_dir(data_dir)
    from services.profile.importer import InvalidInput, import_catalog
    from services.profile.repository import ProfileRepository
    from services.profile.settings import ProfileSettings

    repository = ProfileRepository.open(ProfileSettings(data_dir=data_dir))
    try:
        report = import_catalog(file, repository.upsert_catalog, skip_invalid=skip_invalid)
    except InvalidInput as exc:
        console.print(f"[red]invalid input:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        repository.close()
    console.print(f"{report.accepted:,} items imported, {report.invalid_count:,} invalid lines")
    print_invalid_lines(report)


def print_invalid_lines(report: ImportReport, shown: int = 20) -> None:
    """The first invalid lines of an import, each with its fields and messages."""
    for invalid in report.invalid[:shown]:
        console.print(f"  line {invalid.line}: " + "; ".join(f"{e['field']}: {e['message']}" for e in invalid.errors))
