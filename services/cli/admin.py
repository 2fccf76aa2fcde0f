"""`selaras personas`, `selaras retention` and `selaras keys new`: the scheduled jobs and API keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from services.cli.common import (
    DataDir,
    console,
    publish_report,
    use_data_dir,
)


def personas(
    data_dir: DataDir = Path("data"),
    k_min: Annotated[int, typer.Option(help="Fewest personas to consider.")] = 3,
    k_max: Annotated[int, typer.Option(help="Most personas to consider (the lowest Davies-Bouldin index wins).")] = 6,
    seed: int = 0,
    backfill: Annotated[
        bool, typer.Option(help="Re-assign persona ids in the offline history (what the next training sees).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of tables.")] = False,
    html_report: Annotated[
        bool, typer.Option("--html-report/--no-html-report", help="Store an HTML report with plots (/reports/).")
    ] = True,
) -> None:
    """Learn personas from visitor behaviour, store them, assign every visitor; run it on a schedule."""
    use_data_dir(data_dir)
    from services.common.clock import clock_for, wall_datetime
    from services.features.aggregations import SegmentRules
    from services.profile.persona_jobs import persona_table, run_persona_job
    from services.profile.personas.repository import PersonaRepository
    from services.profile.repository import ProfileRepository
    from services.profile.settings import ProfileSettings
    from services.reports.pages import personas_report

    settings = ProfileSettings(data_dir=data_dir)
    repository = ProfileRepository.open(settings)
    try:
        result = run_persona_job(
            PersonaRepository(repository.store, repository.feature_store, settings.offline_dir),
            SegmentRules.from_settings(settings),
            k_range=range(k_min, k_max + 1),
            seed=seed,
            now=clock_for(settings.clock_start).now(),
            backfill_offline=backfill,
        )
        if html_report:
            html = personas_report(
                result.report(),
                persona_table(result.model, result.assigned),
                result.model.trait_names,
                result.model.centres,
                "personas",
                wall_datetime().isoformat(timespec="seconds"),
            )
            publish_report(repository.store, html, data_dir)
    except ValueError as exc:
        console.print(f"[red]cannot learn personas:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        repository.close()
    report = result.report()
    if as_json:
        console.print_json(json.dumps({**report, "personas": persona_table(result.model, result.assigned)}))
        return
    model = result.model
    scores = ", ".join(
        f"k={k}: DB {v:.3f} / silhouette {model.silhouette_by_k.get(k, float('nan')):.3f}"
        for k, v in sorted(model.davies_bouldin_by_k.items())
    )
    table = Table(
        title=f"personas v{model.version}: k={model.k} by Davies-Bouldin ({scores}); {result.visitors:,} visitors"
    )
    for column in ("id", "persona", "visitors", "share of fit", "what sets it apart"):
        table.add_column(column, justify="right" if column in ("id", "visitors", "share of fit") else "left")
    for entry in persona_table(model, result.assigned):
        table.add_row(
            str(entry["persona_id"]),
            f"{entry['name_id']}\n{entry['name_en']}",
            f"{entry['visitors'] or 0:,}",
            f"{entry['share']:.0%}",
            f"{entry['description_id']}\n{entry['description_en']}",
        )
    console.print(table)
    movement = result.movement
    if movement is None:
        console.print("first persona model: no movement report yet")
    else:
        moves = Table(title=f"movement from v{result.previous_version}: {movement['stayed_share']:.0%} stayed")
        new_ids = sorted({int(n) for row in movement["transitions"].values() for n in row})
        moves.add_column("old \\ new")
        for new_id in new_ids:
            moves.add_column(str(new_id), justify="right")
        for old_id, row in sorted(movement["transitions"].items(), key=lambda kv: int(kv[0])):
            moves.add_row(old_id, *(str(row.get(str(n), 0)) for n in new_ids))
        console.print(moves)
        if movement["new_ids"] or movement["retired_ids"]:
            console.print(f"new personas: {movement['new_ids']}, retired: {movement['retired_ids']}")
    console.print(
        f"{result.online_rows:,} online rows rewritten, {result.segments_changed:,} visitors changed segment, "
        f"{result.offline_rows_backfilled:,} history rows re-assigned, in {result.seconds:.1f} s"
    )


def retention(
    data_dir: DataDir = Path("data"),
    days: Annotated[
        int | None, typer.Option(help="Keep this many days (default PROFILE_RETENTION_DAYS).", min=1)
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would be deleted, delete nothing.")] = False,
) -> None:
    """Delete logged events and offline feature history older than the retention period (run daily)."""
    use_data_dir(data_dir)
    from services.common.clock import clock_for
    from services.profile.privacy.repository import PrivacyRepository
    from services.profile.privacy.service import PrivacyService
    from services.profile.repository import ProfileRepository
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(data_dir=data_dir)
    repository = ProfileRepository.open(settings)
    try:
        privacy = PrivacyService(
            PrivacyRepository(repository.store, repository.feature_store, settings.offline_dir),
            settings.consent_defaults(),
            clock=clock_for(settings.clock_start),
        )
        report = privacy.apply_retention(days or settings.retention_days, dry_run=dry_run)
    finally:
        repository.close()
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} {report.log_events:,} logged events and {report.offline_rows:,} offline feature rows older than "
        f"{report.cutoff} ({report.offline_files_rewritten:,} files rewritten), and {report.archived_events:,} archived"
        f" events ({report.archive_files_rewritten:,} archive files); visitor profiles expire on their own"
    )


def keys_new(
    name: Annotated[str, typer.Option(help="A name for the key (shown in 403 errors and rate-limit metrics).")],
    scopes: Annotated[
        str, typer.Option(help="recommend (browser-safe, read-only), ingest (event senders), admin; join with +")
    ] = "recommend",
) -> None:
    """Print a fresh random API key and the entry to add to SELARAS_API_KEYS (only its hash is stored)."""
    from services.common.security import generate_api_key

    try:
        secret, entry = generate_api_key(name, scopes)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    # soft_wrap: both lines are copied and pasted, so they must not be broken at the terminal width.
    plain: dict[str, Any] = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(f"key (give it to the client; it is not stored anywhere): {secret}", **plain)
    console.print(f"SELARAS_API_KEYS entry (comma-separate several): {entry}", **plain)
