"""`selaras export audience|recommendations`: broadcast lists and personal lists as CSV."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import (
    DataDir,
    console,
    counting,
    err_console,
    progress_bar,
    use_data_dir,
)


def export_audience(
    data_dir: DataDir = Path("data"),
    where: Annotated[
        list[str] | None,
        typer.Option(help="column=value on a segment column (lifecycle=at_risk); repeat a column for any of."),
    ] = None,
    persona: Annotated[list[int] | None, typer.Option(help="Persona id; repeat for any of.")] = None,
    channel: Annotated[
        str | None, typer.Option(help="push, email or whatsapp: only visitors who allow marketing on it.")
    ] = None,
    out: Annotated[Path, typer.Option(help="CSV file to write ('-': standard output).")] = Path("-"),
) -> None:
    """Visitors of a segment or persona as CSV (pseudonymous ids, persona, segments), for a broadcast."""
    use_data_dir(data_dir)
    from services.common.clock import clock_for
    from services.features.aggregations import SegmentRules
    from services.profile.audiences import AudienceCount, AudienceFilter, InvalidAudience, audience_rows, write_csv
    from services.profile.repository import ProfileRepository
    from services.profile.settings import ProfileSettings

    try:
        audience = AudienceFilter.parse(where or [], persona or [], channel)
    except InvalidAudience as exc:
        console.print(f"[red]invalid audience:[/] {exc}")
        raise typer.Exit(2) from exc
    settings = ProfileSettings(data_dir=data_dir)
    repository = ProfileRepository.open(settings)
    count = AudienceCount()
    try:
        rows = audience_rows(
            repository.iter_visitor_states(),
            repository.consents,
            SegmentRules.from_settings(settings),
            settings.consent_defaults(),
            clock_for(settings.clock_start).now(),
            audience,
            count,
        )
        if str(out) == "-":
            write_csv(rows, sys.stdout)
        else:
            with out.open("w", newline="", encoding="utf-8") as handle, progress_bar() as bar:
                task = bar.add_task("exporting the audience", total=None)
                write_csv(counting(rows, lambda n: bar.update(task, completed=n)), handle)
    finally:
        repository.close()
    summary = f"{count.matched:,} of {count.visitors:,} visitors in the audience"
    if channel:
        summary += f"; {count.without_consent:,} more left out: no marketing consent for {channel}"
    err_console.print(summary)


def export_recommendations(
    visitors: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="CSV with a visitor_id column (an exported audience)")
    ],
    data_dir: DataDir = Path("data"),
    kind: Annotated[str, typer.Option(help="product, banner or cta.")] = "product",
    count: Annotated[int, typer.Option(min=1, max=100, help="Items per visitor.")] = 6,
    channel: Annotated[str, typer.Option(help="Context channel the ranking sees (email, whatsapp, push).")] = "email",
    log_impressions: Annotated[
        bool, typer.Option(help="Log the lists as impressions (do it when they are sent: training and attribution).")
    ] = False,
    out: Annotated[Path, typer.Option(help="CSV file to write ('-': standard output).")] = Path("-"),
) -> None:
    """Personal recommendations for every visitor of a list, as CSV rows (visitor, position, item, link)."""
    use_data_dir(data_dir)
    from services.common.catalog import ItemKind
    from services.recommend.batch_export import InvalidVisitorFile, batch_rows, read_visitor_ids, write_csv
    from services.recommend.repository import RecommendRepository
    from services.recommend.service import RecommendService
    from services.recommend.settings import RecommendSettings

    if kind not in {k.value for k in ItemKind} - {"message"}:
        console.print(f"[red]invalid kind:[/] {kind!r}; use product, banner or cta")
        raise typer.Exit(2)
    settings = RecommendSettings(data_dir=data_dir, log_impressions=log_impressions)
    repository = RecommendRepository.open(settings)
    service = RecommendService(settings, repository, settings.consent_defaults())
    written = 0
    try:
        service.refresh_cache()
        service.reload_model()
        if service.model is None:
            err_console.print("[yellow]no trained model: the lists are the fallback ranking (run selaras train)[/]")
        with visitors.open(newline="", encoding="utf-8-sig") as source:
            rows = batch_rows(service, read_visitor_ids(source), ItemKind(kind), count, channel)
            if str(out) == "-":
                written = write_csv(rows, sys.stdout)
            else:
                with out.open("w", newline="", encoding="utf-8") as handle, progress_bar() as bar:
                    task = bar.add_task("ranking", total=None)
                    written = write_csv(counting(rows, lambda n: bar.update(task, completed=n)), handle)
    except InvalidVisitorFile as exc:
        console.print(f"[red]invalid visitor list {visitors}:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        repository.flush()
        repository.close()
    err_console.print(f"{written:,} rows written")
