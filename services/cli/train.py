"""`selaras train` and `selaras evaluate ranking|item2item|policy`: the ranker and its offline evaluation."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from services.cli.common import (
    DataDir,
    StageProgress,
    console,
    metrics_table,
    progress_bar,
    publish_report,
    use_data_dir,
)
from services.cli.histories import DEFAULT_FUSION_POOL


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
    fusion_pool: Annotated[
        int, typer.Option(min=0, help="With --histories: learn a cut of a candidate pool this large (0: none).")
    ] = DEFAULT_FUSION_POOL,
) -> None:
    """Train the LightGBM ranker from the event log and Feast's offline store; save it as the newest model."""
    use_data_dir(data_dir)
    if histories is not None:
        from services.cli.histories import train_on_histories_file

        train_on_histories_file(histories, attributes, data_dir, seed, fusion_pool)
        return
    from services.recommend.repository import RecommendRepository
    from services.recommend.settings import RecommendSettings
    from services.recommend.training.train import TrainConfig, Trainer

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
                candidates=settings.candidate_count(),
                candidate_pool=settings.candidate_pool,
            )
            stages = StageProgress(bar)
            trainer = Trainer(repository, config, stages)
            if engine == "dask" and scheduler:
                from services.recommend.training.distributed import DaskTrainer, connect

                client = connect(scheduler)
                trainer = DaskTrainer(repository, config, client, stages)
            result = trainer.train()
            stages.finish()
        result.publish(repository)
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
    html_report: Annotated[
        bool, typer.Option("--html-report/--no-html-report", help="Store an HTML report with plots (/reports/).")
    ] = True,
) -> None:
    """Rank held-out interactions with the served pipeline and with baselines; print a table, write JSON."""
    if histories is not None:
        from services.cli.histories import evaluate_histories_file

        evaluate_histories_file(histories, attributes, max_visitors, seed, out)
        return
    use_data_dir(data_dir)
    from datetime import datetime

    from services.common.clock import wall_datetime
    from services.recommend.repository import RecommendRepository
    from services.recommend.settings import RecommendSettings
    from services.recommend.training.evaluation import PIPELINE, EvalConfig, RankingEvaluator
    from services.recommend.training.train import TrainConfig
    from services.reports.pages import ranking_report

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
            stages = StageProgress(bar)
            result = RankingEvaluator(repository, settings, config, stages).run()
            stages.finish()
        report = result.to_dict()
        if html_report:
            stamp = wall_datetime().isoformat(timespec="seconds")
            page = ranking_report(report, f"ranking-{protocol}-{target}".replace("_", "-"), stamp)
            publish_report(repository.store, page, data_dir)
    except ValueError as exc:
        console.print(f"[red]cannot evaluate:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        repository.close()
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
    from services.recommend.settings import RecommendSettings
    from services.recommend.training.histories import train_on_histories
    from services.recommend.training.item2item_eval import evaluate_item2item, markdown_rows
    from services.recommend.training.train import TrainConfig

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
        model, _, _ = train_on_histories(
            data.truncated(1),
            settings.candidate_count(),
            config,
            settings.candidate_sources,
            pool=settings.candidate_pool,
        )
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
    use_data_dir(data_dir)
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
