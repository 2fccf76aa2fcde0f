"""`selaras`: one command with subcommands (demo, serve, train, import, shop, ...)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich import box
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.terminal import console, err_console, record_to_html, save_html
from services.demo.commands import shop_app, simulate_messages_command
from services.demo.simulate_ab import simulate_ab_command
from services.messages.cli import register_message_commands
from services.recommend.history_cli import register_history_commands

# DuckDB/ibis deprecation notices on every Feast offline query are noise for CLI users.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

app = typer.Typer(help="Selaras: personalization for online shops.", no_args_is_help=True, add_completion=False)
import_app = typer.Typer(
    help="Import JSON Lines or CSV files (optionally .gz) in the API's schemas.", no_args_is_help=True
)
app.add_typer(shop_app, name="shop")
app.add_typer(import_app, name="import")
app.command("simulate-ab")(simulate_ab_command)
evaluate_app = typer.Typer(help="Offline evaluation: rankings, policies and messages.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")
register_message_commands(app, evaluate_app)
register_history_commands(import_app, evaluate_app)
app.command("simulate-messages")(simulate_messages_command)
T = TypeVar("T")


@app.callback()
def main(
    ctx: typer.Context,
    html: Annotated[
        Path | None,
        typer.Option("--html", dir_okay=False, help="Also save what the command prints (tables, reports) as HTML."),
    ] = None,
) -> None:
    """Selaras: personalization for online shops."""
    if html is not None:
        record_to_html()
        ctx.call_on_close(lambda: save_html(str(html)))


DataDir = Annotated[Path, typer.Option("--data-dir", envvar="SELARAS_DATA_DIR", help="Where Selaras keeps its data.")]


def _settings_env(data_dir: Path) -> None:
    os.environ["SELARAS_DATA_DIR"] = str(data_dir.resolve())


class StageProgress:
    """A Rich progress bar per named stage, fed with fractions 0..1."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        task = self.tasks.get(stage)
        if task is None:
            task = self.tasks[stage] = self.progress.add_task(stage, total=1.0)
        self.progress.update(task, completed=min(max(fraction, 0.0), 1.0))


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


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="profile or recommend")],
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default 8001 profile, 8002 recommend).")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes (recommend scales with cores).")] = 1,
) -> None:
    """Run one service with uvicorn."""
    import uvicorn

    if service not in ("profile", "recommend"):
        raise typer.BadParameter("service must be 'profile' or 'recommend'")
    if workers > 1 and not os.environ.get("SELARAS_METRICS_DIR"):
        metrics_dir = Path(os.environ.get("SELARAS_DATA_DIR", "data")) / "metrics" / service
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        # Workers are fresh (spawned) interpreters: they read this before importing prometheus_client.
        os.environ["SELARAS_METRICS_DIR"] = str(metrics_dir.resolve())
    uvicorn.run(
        f"services.{service}.app:create_app",
        factory=True,
        host=host,
        port=port or (8001 if service == "profile" else 8002),
        workers=workers,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )


export_app = typer.Typer(help="Export audiences (segment or persona members) as CSV.", no_args_is_help=True)
app.add_typer(export_app, name="export")
run_app = typer.Typer(help="Run a background process (the aggregator).", no_args_is_help=True)
app.add_typer(run_app, name="run")


@run_app.command("aggregator")
def run_aggregator(
    data_dir: DataDir = Path("data"),
    host: Annotated[str, typer.Option(help="Bind address of /healthz, /readyz and /metrics.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of /healthz, /readyz and /metrics (0: none).")] = 8003,
) -> None:
    """Fold the event log into features, as its own process (production: set PROFILE_AGGREGATOR_ENABLED=false
    on the profile API). It folds only while it holds the log's lease; started twice, one folds and the other
    waits as a standby that takes over within the lease time if the first stops or dies."""
    _settings_env(data_dir)
    from services.common.observability import configure_logging
    from services.common.storage import check_redis_durability
    from services.profile.app import build_state
    from services.profile.probe_server import serve_probes
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(data_dir=data_dir)
    configure_logging(settings.log_level)
    state = build_state(settings)
    check_redis_durability(state.repository.store, settings.environment)
    aggregator = state.aggregator
    probes = serve_probes(host, port, aggregator) if port else None
    stopped = False

    def stop(*_: Any) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    console.print(
        f"aggregator {aggregator.holder} on {len(aggregator.partitions)} log partition(s)"
        f" ({state.repository.store.backend})"
    )
    aggregator.start(settings.aggregator_batch, settings.aggregator_idle_s)
    try:
        while not stopped and aggregator.alive:
            time.sleep(0.2)
    finally:
        aggregator.stop()  # finishes the batch in flight, then releases the lease
        if probes is not None:
            probes.shutdown()
        state.repository.close()


@app.command()
def train(
    data_dir: DataDir = Path("data"),
    source: Annotated[str, typer.Option(help="auto, behaviour or impressions")] = "auto",
    max_queries: Annotated[int, typer.Option(help="Cap on training queries (sampled).")] = 12_000,
    seed: int = 7,
    reload_url: Annotated[
        list[str] | None,
        typer.Option(
            help="POST /v1/admin/reload here after training to serve at once (replicas follow the registry anyway)."
        ),
    ] = None,
    engine: Annotated[str, typer.Option(help="local, or dask: LightGBM on the Dask cluster at --scheduler.")] = "local",
    scheduler: Annotated[
        str | None, typer.Option(envvar="SELARAS_DASK_SCHEDULER", help="Dask scheduler address (tcp://host:8786).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SELARAS_ADMIN_API_KEY", help="Admin API key sent with the reload.")
    ] = None,
    histories: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help='Train on a "user item item ..." file (folded in-process).'),
    ] = None,
    attributes: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="With --histories.")] = None,
) -> None:
    """Train the LightGBM ranker from the event log and Feast's offline store; save it as the newest model."""
    _settings_env(data_dir)
    if histories is not None:
        from services.recommend.history_cli import train_on_histories_file

        train_on_histories_file(histories, attributes, data_dir, seed)
        return
    from services.recommend.repository import RecommendRepository
    from services.recommend.settings import RecommendSettings
    from services.recommend.training import TrainConfig, Trainer

    if engine not in ("local", "dask"):
        raise typer.BadParameter("engine must be 'local' or 'dask'")
    if engine == "dask" and not scheduler:
        raise typer.BadParameter("--engine dask needs --scheduler ADDRESS (or SELARAS_DASK_SCHEDULER)")
    settings = RecommendSettings(data_dir=data_dir)
    repository = RecommendRepository.open(settings)
    client = None
    try:
        with progress_bar() as bar:
            config = TrainConfig(
                source=source,  # type: ignore[arg-type]
                max_queries=max_queries,
                seed=seed,
                analytics_default=settings.consent_analytics,
            )
            trainer = Trainer(repository, config, StageProgress(bar))
            if engine == "dask" and scheduler:
                from services.recommend.distributed import DaskTrainer, connect

                client = connect(scheduler)
                trainer = DaskTrainer(repository, config, client, StageProgress(bar))
            result = trainer.train()
        repository.save_model(result.model_text, result.meta)
    except ValueError as exc:
        console.print(f"[red]cannot train:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        if client is not None:
            client.close()
        repository.close()
    console.print(metrics_table(f"model {result.meta.version} ({engine})", result.metrics))
    for url in reload_url or []:
        headers = {"X-API-Key": api_key} if api_key else {}
        request = urllib.request.Request(f"{url.rstrip('/')}/v1/admin/reload", method="POST", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            console.print(f"reloaded {url}: {response.read().decode()}")


@import_app.command("events")
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
    _settings_env(data_dir)
    from services.common.clock import DataClock
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
    for invalid in report.invalid[:20]:
        console.print(f"  line {invalid.line}: " + "; ".join(f"{e['field']}: {e['message']}" for e in invalid.errors))
    if report.folded_by_live_aggregator:
        console.print("a running aggregator held the log: it folded the imported events on its own clock")


@import_app.command("customers")
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
    _settings_env(data_dir)
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
    for invalid in report.invalid[:20]:
        console.print(f"  line {invalid.line}: " + "; ".join(f"{e['field']}: {e['message']}" for e in invalid.errors))


@import_app.command("catalog")
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
    _settings_env(data_dir)
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
    for invalid in report.invalid[:20]:
        console.print(f"  line {invalid.line}: " + "; ".join(f"{e['field']}: {e['message']}" for e in invalid.errors))


@evaluate_app.command("ranking")
def evaluate_ranking_command(
    data_dir: DataDir = Path("data"),
    protocol: Annotated[str, typer.Option(help="leave-last-out or time.")] = "leave-last-out",
    target: Annotated[str, typer.Option(help="purchase, product_view, add_to_cart or click.")] = "product_view",
    k: Annotated[list[int] | None, typer.Option("--k", help="Cut-offs; repeat for several (default 5 10 20).")] = None,
    seed: int = 7,
    max_visitors: Annotated[int | None, typer.Option(help="Evaluate a random sample of visitors (quick runs).")] = None,
    cutoff: Annotated[str | None, typer.Option(help="time protocol: the cut-off, ISO date or date-time.")] = None,
    max_queries: Annotated[int, typer.Option(help="Cap on training queries (sampled).")] = 12_000,
    train_on: Annotated[str, typer.Option(help="target (the protocol) or behaviour (views, carts, purchases).")] = (
        "target"
    ),
    out: Annotated[Path | None, typer.Option(help="JSON report (default DATA_DIR/evaluation/ranking.json).")] = None,
    histories: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help='"user item item ..." file: the published protocol on it.'),
    ] = None,
    attributes: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="With --histories.")] = None,
) -> None:
    """Rank held-out interactions with the served pipeline and with baselines; print a table, write JSON."""
    if histories is not None:
        from services.recommend.history_cli import evaluate_histories_file

        evaluate_histories_file(histories, attributes, max_visitors, seed, out)
        return
    _settings_env(data_dir)
    from datetime import datetime

    from services.recommend.evaluation import PIPELINE, EvalConfig, RankingEvaluator
    from services.recommend.repository import RecommendRepository
    from services.recommend.settings import RecommendSettings
    from services.recommend.training import TrainConfig

    if protocol not in ("leave-last-out", "time") or target not in ("purchase", "product_view", "add_to_cart", "click"):
        raise typer.BadParameter("--protocol is leave-last-out|time, --target purchase|product_view|add_to_cart|click")
    if train_on not in ("target", "behaviour"):
        raise typer.BadParameter("--train-on is target or behaviour")
    cut = None
    if cutoff is not None:
        moment = datetime.fromisoformat(cutoff)
        cut = moment.astimezone().timestamp()  # a naive time is local time
    ks = tuple(sorted(set(k or [5, 10, 20])))
    config = EvalConfig(
        protocol=protocol,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        ks=ks,
        seed=seed,
        max_visitors=max_visitors,
        cutoff=cut,
        train=TrainConfig(max_queries=max_queries, seed=seed),
        train_on=train_on,  # type: ignore[arg-type]
    )
    settings = RecommendSettings(data_dir=data_dir)
    repository = RecommendRepository.open(settings)
    try:
        with progress_bar() as bar:
            result = RankingEvaluator(repository, settings, config, StageProgress(bar)).run()
    except ValueError as exc:
        console.print(f"[red]cannot evaluate:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        repository.close()
    report = result.to_dict()
    # Methods as columns: six narrow columns fit a terminal, eleven metric columns would not.
    labels = {
        PIPELINE: "LightGBM",
        "popular": "popular",
        "popular_24h": "pop 24h",
        "popular_7d": "pop 7d",
        "covisitation": "co-visit",
        "lightgbm_no_personal": "no-pers.",
    }
    table = Table(title=f"{protocol}, target {target}, {result.counts['test_queries']:,} queries", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    for method in result.methods:
        table.add_column(labels.get(method, method), justify="right")
    metrics = [f"{m}@{cut_k}" for cut_k in ks for m in ("hr", "ndcg", "mrr")] + ["coverage", "candidate_recall"]
    for metric in metrics:
        name = metric.upper() if "@" in metric else {"candidate_recall": "cand. recall"}.get(metric, metric)
        table.add_row(name, *(f"{row[metric]:.4f}" for row in result.methods.values()))
    console.print(table)
    counts = result.counts
    console.print(
        f"{counts['visitors_evaluated']:,} visitors evaluated, {counts['visitors_skipped_few_interactions']:,} "
        f"skipped (fewer than {config.min_interactions} {target} interactions); "
        f"{counts['train_queries']:,} training queries"
    )
    for method, diff in result.comparisons.items():
        key = next(iter(diff))
        console.print(
            f"  {PIPELINE} − {method}: {key.split('_')[0]} {diff[key]:+.4f} "
            f"(95% CI {diff['ci95_low']:+.4f} … {diff['ci95_high']:+.4f})"
        )
    path = out or data_dir / "evaluation" / "ranking.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))
    console.print(f"report written to {path}")


@evaluate_app.command("item2item")
def evaluate_item2item_command(
    histories: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help='"user item item ..." file (leave-last-out).')
    ],
    attributes: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="item -> attribute ids")] = None,
    max_users: Annotated[int | None, typer.Option(help="Evaluate a random sample of users (quick runs).")] = None,
    seed: int = 7,
    out: Annotated[Path | None, typer.Option(help="JSON report.")] = None,
    personal: Annotated[
        bool, typer.Option(help="Also train the ranker (minutes) and measure the strategies re-ranked per user.")
    ] = False,
) -> None:
    """HR@10 / NDCG@10 of the item-to-item strategies predicting each user's last item from the one before."""
    from services.profile.sequences import SequenceFileError, read_histories
    from services.recommend.history_training import train_on_histories
    from services.recommend.item2item_eval import evaluate_item2item, markdown_rows
    from services.recommend.settings import RecommendSettings
    from services.recommend.training import TrainConfig

    started = time.perf_counter()
    try:
        data = read_histories(histories, attributes)
    except SequenceFileError as exc:
        console.print(f"[red]invalid input:[/] {exc}")
        raise typer.Exit(2) from exc
    model = None
    if personal:
        settings = RecommendSettings()
        config = TrainConfig(max_queries=10**9, seed=seed)
        model, _, _ = train_on_histories(data.truncated(1), settings.max_candidates, config, settings.candidate_sources)
        console.print(f"ranker trained in {time.perf_counter() - started:.0f} s")
    result = evaluate_item2item(histories.stem, data, max_users, seed, model=model)
    console.print(f"{histories.stem}: {result.users:,} users, {result.items:,} items, leave-last-out")
    for row in markdown_rows(result):
        console.print(row, markup=False)
    console.print(f"{time.perf_counter() - started:.1f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=2, default=float))
        console.print(f"report written to {out}")


@evaluate_app.command("policy")
def evaluate_policy_command(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="Logged events (.jsonl/.jsonl.gz): impressions and clicks."),
    ],
    data_dir: DataDir = Path("data"),
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="model, epsilon:<e>, uniform, popular, logging; repeat for several."),
    ] = None,
    cluster: Annotated[str, typer.Option(help="Confidence intervals clustered by visitor or recommendation.")] = (
        "visitor"
    ),
    window_hours: Annotated[float, typer.Option(help="A click counts this long after its impression.")] = 24.0,
    history: Annotated[
        str, typer.Option(help="Events for the popular target's replay: file (FILE itself) or store (the log).")
    ] = "file",
    out: Annotated[Path | None, typer.Option(help="JSON report (default DATA_DIR/evaluation/policy.json).")] = None,
) -> None:
    """Off-policy CTR of rankings from logged impressions with propensities (IPS, SNIPS, doubly robust)."""
    _settings_env(data_dir)
    from services.offline.policy import evaluate_file
    from services.offline.slates import FileEvents
    from services.recommend.repository import RecommendRepository
    from services.recommend.settings import RecommendSettings

    if cluster not in ("visitor", "recommendation") or history not in ("file", "store"):
        raise typer.BadParameter("--cluster is visitor|recommendation and --history is file|store")
    targets = target or ["model", "uniform", "popular", "logging"]
    settings = RecommendSettings(data_dir=data_dir)
    repository = RecommendRepository.open(settings)
    events = FileEvents(file)
    try:
        catalog = repository.catalog()
        if "popular" in targets and not catalog:
            console.print("[yellow]no catalog in the data directory: the popular target is left out[/]")
            targets = [t for t in targets if t != "popular"]
        replay = repository.logged_events() if history == "store" else None
        with console.status("estimating"):
            report = evaluate_file(
                events,
                targets,
                catalog,
                history=replay,
                cluster=cluster,  # type: ignore[arg-type]
                attribution_window_s=window_hours * 3600.0,
                max_per_category=settings.max_per_category,
            )
    except ValueError as exc:
        console.print(f"[red]cannot evaluate:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        repository.close()
    report["invalid_lines"] = len(events.invalid_lines)
    table = Table(title=f"off-policy CTR per impression ({report['slates']:,} slates, CIs by {cluster})")
    for column in ("policy", "estimator", "CTR", "95% CI", "ESS", "max weight", "slates"):
        table.add_column(column, justify="left" if column in ("policy", "estimator") else "right")
    for policy in report["policies"]:
        for estimator in ("ips", "snips", "dr"):
            estimate = policy.get(estimator)
            if estimate is None:
                continue
            low, high = estimate["ci95"]
            table.add_row(
                policy["policy"] if estimator == "ips" else "",
                estimator,
                f"{estimate['value']:.4f}",
                f"{low:.4f} … {high:.4f}",
                f"{estimate['ess']:,.0f}",
                f"{estimate['max_weight']:,.1f}",
                f"{policy['slates']:,}" if estimator == "ips" else "",
            )
    console.print(table)
    console.print(
        f"logged CTR {report['logged_ctr']:.4f}; "
        f"{report['explored_slates']:,} of {report['slates']:,} slates explored; "
        f"{report['clicks_attributed']:,} of {report['clicks']:,} clicks attributed; "
        f"{report['malformed_slates']:,} malformed slates; {report['invalid_lines']:,} invalid lines"
    )
    for policy in report["policies"]:
        if policy["skipped_slates"]:
            console.print(
                f"[yellow]{policy['policy']}: {policy['skipped_slates']:,} slates lack what it needs "
                "(ranks and pool are logged only when exploring)[/]"
            )
    path = out or data_dir / "evaluation" / "policy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))
    console.print(f"report written to {path}")


def _wait_ready(url: str, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


CURL_EXAMPLES = """\
# 1. Recommendations for a visitor (3 slots, with reasons):
curl -s {recommend}/v1/recommend -H 'content-type: application/json' -d '{{
  "visitor_id": "{visitor}", "explain": true,
  "context": {{"device": "mobile", "channel": "web", "city": "Jakarta"}},
  "slots": [{{"name": "home_products", "kind": "product", "count": 6}},
            {{"name": "hero_banner", "kind": "banner", "count": 1}},
            {{"name": "cta", "kind": "cta", "count": 2}}]}}'

# 2. Send behaviour events (idempotent on event_id):
curl -s {profile}/v1/events -H 'content-type: application/json' -d '{{"events": [
  {{"event_id": "demo-1", "visitor_id": "{visitor}", "type": "product_view", "item_id": "{item}",
    "timestamp": "{now}", "context": {{"device": "mobile", "city": "Jakarta"}}}}]}}'

# 3. The visitor's profile: features, segments, persona, consent:
curl -s {profile}/v1/profiles/{visitor}
"""


@app.command()
def demo(
    data_dir: DataDir = Path("data"),
    visitors: Annotated[int, typer.Option(help="Simulated visitors.")] = 1000,
    days: Annotated[int, typer.Option(help="Days of history.")] = 30,
    seed: int = 7,
    serve_services: Annotated[bool, typer.Option("--serve/--no-serve", help="Start both services at the end.")] = True,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the demo data even if it exists.")] = False,
    profile_port: int = 8001,
    recommend_port: int = 8002,
) -> None:
    """Generate the demo shop, import its history, train, and start both services on embedded stores."""
    _settings_env(data_dir)
    from services.common.settings import CommonSettings

    marker = data_dir / "demo.json"
    wanted = {"visitors": visitors, "days": days, "seed": seed}
    current = json.loads(marker.read_text()) if marker.exists() else None
    if rebuild or current is None or current.get("params") != wanted:
        if data_dir.exists() and current is not None:
            import shutil

            shutil.rmtree(data_dir)
        from services.demo.world import build_world

        settings = CommonSettings(data_dir=data_dir, redis_url=os.environ.get("REDIS_URL"))
        console.print(f"building the demo shop in {data_dir}/ ({visitors:,} visitors, {days} days)")
        with progress_bar() as bar:
            world = build_world(settings, visitors=visitors, days=days, seed=seed, progress=StageProgress(bar))
        console.print(metrics_table(f"model {world.model_version} (time split)", world.train_metrics))
        sample_visitor = world.simulator.visitors[0].visitor_id
        sample_item = world.shop.products[0].item_id
        marker.write_text(
            json.dumps(
                {
                    "params": wanted,
                    "visitor": sample_visitor,
                    "item": sample_item,
                    "events": world.events,
                    "metrics": world.train_metrics,
                }
            )
        )
        current = json.loads(marker.read_text())
    else:
        console.print(f"reusing the demo data in {data_dir}/ (--rebuild to start over)")
    if not serve_services:
        return
    _run_services(data_dir, profile_port, recommend_port, current["visitor"], current["item"])


def _run_services(data_dir: Path, profile_port: int, recommend_port: int, visitor: str, item: str) -> None:
    env = {**os.environ, "SELARAS_DATA_DIR": str(data_dir.resolve())}
    children = [
        subprocess.Popen([sys.executable, "-m", "services.cli", "serve", name, "--port", str(port)], env=env)
        for name, port in (("profile", profile_port), ("recommend", recommend_port))
    ]
    profile_url, recommend_url = f"http://127.0.0.1:{profile_port}", f"http://127.0.0.1:{recommend_port}"

    def stop(*_: Any) -> None:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(15)
        raise typer.Exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        if not (_wait_ready(f"{profile_url}/readyz") and _wait_ready(f"{recommend_url}/readyz")):
            console.print("[red]a service did not become ready; see its log above[/]")
            stop()
        from services.common.clock import clock_for

        console.print(
            f"\n[bold green]Selaras is running[/]\n  profile:   {profile_url}/docs\n"
            f"  recommend: {recommend_url}/docs\n  experiments: {recommend_url}/experiments\n"
        )
        console.print(
            CURL_EXAMPLES.format(
                recommend=recommend_url,
                profile=profile_url,
                visitor=visitor,
                item=item,
                now=clock_for(None).now_datetime().isoformat(timespec="seconds"),
            ),
            highlight=False,
            markup=False,
            soft_wrap=True,  # copy-paste curls must not be wrapped at the terminal width
        )
        console.print("Ctrl-C stops both services.")
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        console.print("[red]a service exited[/]")
    except KeyboardInterrupt:
        pass
    stop()


@export_app.command("audience")
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
    _settings_env(data_dir)
    from services.common.clock import clock_for
    from services.profile.aggregations import SegmentRules
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
                write_csv(_counting(rows, lambda n: bar.update(task, completed=n)), handle)
    finally:
        repository.close()
    summary = f"{count.matched:,} of {count.visitors:,} visitors in the audience"
    if channel:
        summary += f"; {count.without_consent:,} more left out: no marketing consent for {channel}"
    err_console.print(summary)


@export_app.command("recommendations")
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
    _settings_env(data_dir)
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
                    written = write_csv(_counting(rows, lambda n: bar.update(task, completed=n)), handle)
    except InvalidVisitorFile as exc:
        console.print(f"[red]invalid visitor list {visitors}:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        repository.flush()
        repository.close()
    err_console.print(f"{written:,} rows written")


def _counting(rows: Iterable[T], report: Callable[[int], None], every: int = 1000) -> Iterator[T]:
    n = 0
    for n, row in enumerate(rows, start=1):
        if n % every == 0:
            report(n)
        yield row
    report(n)


# -- personas, retention, API keys --------------------------------------------------------------------


@app.command()
def personas(
    data_dir: DataDir = Path("data"),
    k_min: Annotated[int, typer.Option(help="Fewest personas to consider.")] = 3,
    k_max: Annotated[int, typer.Option(help="Most personas to consider (the lowest Davies-Bouldin index wins).")] = 6,
    seed: int = 0,
    backfill: Annotated[
        bool, typer.Option(help="Re-assign persona ids in the offline history (what the next training sees).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of tables.")] = False,
) -> None:
    """Learn personas from visitor behaviour, store them, assign every visitor; run it on a schedule."""
    _settings_env(data_dir)
    from services.common.clock import clock_for
    from services.profile.aggregations import SegmentRules
    from services.profile.persona_jobs import persona_table, run_persona_job
    from services.profile.repository import ProfileRepository
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(data_dir=data_dir)
    repository = ProfileRepository.open(settings)
    try:
        result = run_persona_job(
            repository.store,
            repository.feature_store,
            settings.offline_dir,
            SegmentRules.from_settings(settings),
            k_range=range(k_min, k_max + 1),
            seed=seed,
            now=clock_for(settings.clock_start).now(),
            backfill_offline=backfill,
        )
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


@app.command()
def retention(
    data_dir: DataDir = Path("data"),
    days: Annotated[
        int | None, typer.Option(help="Keep this many days (default PROFILE_RETENTION_DAYS).", min=1)
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would be deleted, delete nothing.")] = False,
) -> None:
    """Delete logged events and offline feature history older than the retention period (run daily)."""
    _settings_env(data_dir)
    from services.common.clock import clock_for
    from services.profile.privacy import PrivacyService
    from services.profile.repository import ProfileRepository
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(data_dir=data_dir)
    repository = ProfileRepository.open(settings)
    try:
        privacy = PrivacyService(
            repository.store,
            repository.feature_store,
            settings.offline_dir,
            settings.consent_defaults(),
            clock=clock_for(settings.clock_start),
        )
        report = privacy.apply_retention(days or settings.retention_days, dry_run=dry_run)
    finally:
        repository.close()
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} {report.log_events:,} logged events and {report.offline_rows:,} offline feature rows older than "
        f"{report.cutoff} ({report.offline_files_rewritten:,} files rewritten); visitor profiles expire on their own"
    )


keys_app = typer.Typer(help="API keys: create a key and its SELARAS_API_KEYS entry.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
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


if __name__ == "__main__":
    app()
