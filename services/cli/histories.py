"""CLI commands for interaction histories ("user item item ..." files): import them as catalog and events,
train the served ranker on them, evaluate with the published protocol (one file, or every file of a folder
into docs/quality.md)."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from services.common.terminal import console

HistoriesFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help='"user item item ..." lines')]
AttributesFile = Annotated[
    Path | None, typer.Option(exists=True, dir_okay=False, help="JSON: item id -> attribute ids (category, brand)")
]
# Off by default: on the public splits the learned cut of 1,500 raised candidate recall by 0.017 (Toys) but
# not NDCG@10, and the larger pool costs CPU per request (docs/quality-ablation.md). 1500 is the measured size.
DEFAULT_FUSION_POOL = 0
FusionPool = Annotated[
    int,
    typer.Option(min=0, help="Learn a cut of a candidate pool this large, saved with the model (0: none)."),
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def import_histories_command(
    file: HistoriesFile,
    attributes: AttributesFile = None,
    out: Annotated[Path, typer.Option(help="Folder for catalog.jsonl and events.jsonl.")] = Path("histories"),
) -> None:
    """Turn histories into the importer's files: products (attributes as category, brand and tags) and one
    purchase event per interaction, in order, with synthetic increasing timestamps."""
    from services.profile.sequences import SequenceFileError, read_histories, write_jsonl

    try:
        histories = read_histories(file, attributes)
    except SequenceFileError as exc:
        console.print(f"[red]invalid input:[/] {exc}")
        raise typer.Exit(2) from exc
    out.mkdir(parents=True, exist_ok=True)
    items, events = write_jsonl(histories, out / "events.jsonl", out / "catalog.jsonl")
    console.print(f"{items:,} items and {events:,} events ({len(histories.users):,} users) written to {out}")
    console.print(
        f"next: selaras import catalog {out / 'catalog.jsonl'} && selaras import events {out / 'events.jsonl'}"
    )


def train_on_histories_file(file: Path, attributes: Path | None, data_dir: Path, seed: int, fusion_pool: int) -> None:
    """`selaras train --histories FILE`: the model `evaluate ranking --histories` measures (there, trained
    without each user's last interaction), trained on everything and saved as the newest model."""
    from services.common.clock import wall_time
    from services.features.aggregations import SegmentRules
    from services.profile.sequences import read_histories
    from services.recommend.repository import RecommendRepository
    from services.recommend.settings import RecommendSettings
    from services.recommend.training.histories import train_on_histories
    from services.recommend.training.train import TrainConfig

    settings = RecommendSettings(data_dir=data_dir)
    histories = read_histories(file, attributes)
    config = TrainConfig(max_queries=10**9, seed=seed, fusion_pool=fusion_pool)
    model, text, metrics = train_on_histories(
        histories,
        settings.candidate_count(),
        config,
        settings.candidate_sources,
        rules=SegmentRules.from_settings(settings),
        progress=_stage_printer(),
        pool=settings.candidate_pool,
    )
    # Models are ordered by when they were made (wall time, as `selaras train` stamps them), not by data time.
    made = wall_time()
    meta = replace(model.meta, version=f"{model.meta.version}-{int(made)}", created_at=made)
    repository = RecommendRepository.open(settings)
    try:
        repository.save_model(
            text,
            meta,
            model.embeddings.to_bytes() if model.embeddings else None,
            model.fusion.to_bytes() if model.fusion else None,
        )
    finally:
        repository.close()
    console.print(f"model {meta.version} saved: {metrics}")


def evaluate_histories_file(
    file: Path,
    attributes: Path | None,
    max_users: int | None,
    seed: int,
    out: Path | None,
    fusion_pool: int = DEFAULT_FUSION_POOL,
) -> dict[str, object]:
    """`selaras evaluate ranking --histories FILE`: the published protocol on one file; prints and writes JSON."""
    from services.profile.sequences import read_histories
    from services.recommend.settings import RecommendSettings
    from services.recommend.training.history_eval import evaluate_histories
    from services.recommend.training.train import TrainConfig

    started = time.perf_counter()
    histories = read_histories(file, attributes)
    settings = RecommendSettings()
    config = TrainConfig(max_queries=10**9, seed=seed, fusion_pool=fusion_pool)
    result = evaluate_histories(file.stem, histories, settings, config, _stage_printer(), max_users=max_users)
    report = result.to_dict()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 0)
    table = Table(title=f"{file.stem}: leave-last-out, full ranking, {result.users:,} users")
    for column in ("method", "HR@10 (95% CI)", "NDCG@10 (95% CI)", "cand. recall"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, row in result.methods.items():
        table.add_row(
            method,
            f"{row['hr@10']:.4f} ({row['hr@10_ci95_low']:.4f}–{row['hr@10_ci95_high']:.4f})",
            f"{row['ndcg@10']:.4f} ({row['ndcg@10_ci95_low']:.4f}–{row['ndcg@10_ci95_high']:.4f})",
            f"{row['candidate_recall']:.3f}",
        )
    for method, (hr, ndcg) in result.published.items():
        table.add_row(f"reference: {method}", f"{hr:.4f}", f"{ndcg:.4f}", "")
    console.print(table)
    console.print(f"{report['wall_seconds']} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float))
        console.print(f"report written to {out}")
    return report


def evaluate_public_command(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder of NAME.txt histories")],
    report: Annotated[Path, typer.Option(help="Markdown report.")] = Path("docs/quality.md"),
    max_users: Annotated[int | None, typer.Option(help="Evaluate a random sample of users (quick runs).")] = None,
    seed: int = 7,
    fusion_pool: FusionPool = DEFAULT_FUSION_POOL,
) -> None:
    """Every data set of the folder with the published protocol; writes a Markdown report and JSON next to it."""
    from services.profile.sequences import read_histories
    from services.recommend.settings import RecommendSettings
    from services.recommend.training.history_eval import evaluate_histories
    from services.recommend.training.history_report import data_sets, markdown
    from services.recommend.training.train import TrainConfig

    found = data_sets(folder)
    if not found:
        console.print(f"[red]no NAME.txt histories in {folder}[/]")
        raise typer.Exit(2)
    results, timings = [], {}
    for name, path, attributes in found:
        console.print(f"[bold]{name}[/]")
        started = time.perf_counter()
        histories = read_histories(path, attributes)
        config = TrainConfig(max_queries=10**9, seed=seed, fusion_pool=fusion_pool)
        result = evaluate_histories(name, histories, RecommendSettings(), config, _stage_printer(), max_users)
        timings[name] = {"total": round(time.perf_counter() - started, 1)}
        results.append(result)
        row = result.methods["lightgbm_pipeline"]
        console.print(
            f"  NDCG@10 {row['ndcg@10']:.4f}, HR@10 {row['hr@10']:.4f}, candidate recall {row['candidate_recall']:.3f}"
        )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(results, timings) + f"\nPeak resident memory of the run: {_peak_rss_mb():.0f} MB.\n")
    report.with_suffix(".json").write_text(json.dumps([r.to_dict() for r in results], indent=2, default=float))
    console.print(f"report written to {report}")


# Cumulative generator sets of the ablation: what each generator adds to candidate recall and NDCG@10.
ABLATION_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "popularity, trending, new arrivals, category, brand",
        ("popular", "trending", "new_arrival", "category", "brand"),
    ),
    ("+ co-visitation (order-aware next item) and cart", ("covisitation", "cart")),
    ("+ two steps ahead", ("two_step",)),
    ("+ shared specific tags (attribute neighbours)", ("shared_tags",)),
    ("+ item embeddings (SVD of the visitor x item matrix)", ("embedding",)),
)


def evaluate_ablation_command(
    file: HistoriesFile,
    attributes: AttributesFile = None,
    report: Annotated[Path, typer.Option(help="Markdown table.")] = Path("docs/quality-ablation.md"),
    max_users: Annotated[int | None, typer.Option(help="Evaluate a random sample of users (quick runs).")] = None,
    seed: int = 7,
    fusion_pool: FusionPool = DEFAULT_FUSION_POOL,
) -> None:
    """Generators added one at a time (each step trains its own ranker), the first ones in priority order,
    then every generator with the learned cut of a larger pool: candidate recall and NDCG@10."""
    from services.profile.sequences import read_histories
    from services.recommend.settings import RecommendSettings
    from services.recommend.training.history_eval import PIPELINE, evaluate_histories
    from services.recommend.training.train import TrainConfig

    histories = read_histories(file, attributes)
    rows = []
    sources: tuple[str, ...] = ()
    steps: list[tuple[str, tuple[str, ...], int]] = []
    for label, added in ABLATION_STEPS:
        sources = (*sources, *added)
        steps.append((label, sources, 0))
    if fusion_pool:
        steps.append((f"+ learned fusion: the best of a pool of {fusion_pool:,}", sources, fusion_pool))
    for label, step_sources, pool in steps:
        console.print(f"[bold]{label}[/]")
        settings = RecommendSettings(candidate_sources=step_sources)
        config = TrainConfig(max_queries=10**9, seed=seed, fusion_pool=pool)
        result = evaluate_histories(file.stem, histories, settings, config, _stage_printer(), max_users)
        row = result.methods[PIPELINE]
        rows.append(
            f"| {label} | {row['candidate_recall']:.3f} | {row['hr@10']:.4f} | {row['ndcg@10']:.4f} "
            f"({row['ndcg@10_ci95_low']:.4f}–{row['ndcg@10_ci95_high']:.4f}) |"
        )
        console.print(rows[-1])
    users = f"{max_users:,} sampled users" if max_users else "every user"
    served = RecommendSettings().candidate_count().for_products(len(histories.item_ids()))
    lines = [
        f"# Candidate generators, one at a time: {file.stem}",
        "",
        f"Published protocol ({users}, full ranking, {served:,} candidates); each row",
        "trains its own ranker on the candidates of its generators (the ranker's features stay the same).",
        "",
        "| generators | candidate recall | HR@10 | NDCG@10 (95% CI) |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    console.print(f"report written to {report}")


def _stage_printer() -> Callable[[str, float], None]:
    started = time.perf_counter()
    printed: set[str] = set()

    def show(stage: str, _fraction: float) -> None:
        if stage not in printed:
            printed.add(stage)
            console.print(f"  {time.perf_counter() - started:6.1f} s  {stage}")

    return show


def register_history_commands(import_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    import_app.command("histories")(import_histories_command)
    evaluate_app.command("public")(evaluate_public_command)
    evaluate_app.command("ablation")(evaluate_ablation_command)
