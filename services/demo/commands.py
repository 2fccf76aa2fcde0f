"""The demo's commands: `selaras shop ...` (the demo shop's catalog and a simulated visitor history),
`selaras simulate-messages` (message decisions and reactions on the demo shop), `selaras simulate-ab` (A/B, A/A
and model vs model experiments on the demo shop, simulate_ab.py), and the simulated traffic that `selaras demo`
sends through the shipped experiment so /experiments shows a report with numbers."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final

import typer
import yaml
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from services.common.clock import SYSTEM_CLOCK
from services.common.context import WIB
from services.common.events import Event
from services.common.settings import CommonSettings
from services.common.terminal import console
from services.demo.files import write_jsonl
from services.demo.shop import generate_shop
from services.demo.simulator import Simulator

DEMO_EXPERIMENT = "personalized-home"  # the experiment shipped in experiments.yaml
CATALOG_FILE = "catalog.jsonl"
EVENTS_FILE = "events.jsonl.gz"
VISITORS_FILE = "visitors.jsonl"
log = logging.getLogger(__name__)

shop_app = typer.Typer(
    help="The demo shop: an Indonesian catalog and simulated visitors with hidden tastes.",
    no_args_is_help=True,
)


@shop_app.callback()
def shop_main() -> None:
    """The demo shop: an Indonesian catalog and simulated visitors with hidden tastes."""
    # A callback keeps `generate` a sub-command even while it is the only command.


@dataclass(frozen=True)
class GeneratedDataset:
    out: Path
    catalog_items: int
    events: int
    visitors: int
    days: int
    start: datetime
    end: datetime
    seconds: float


def generate_dataset(
    out: Path,
    visitors: int = 1000,
    days: int = 30,
    seed: int = 7,
    end: datetime | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> GeneratedDataset:
    """Write catalog.jsonl, events.jsonl.gz and visitors.jsonl (the hidden types, for evaluation) to `out`.

    The history covers the `days` days before `end` (default: today's midnight in WIB), so the catalog's
    "new arrivals" are new at the end of the history. `on_progress` gets the covered fraction (0..1).
    """
    began = time.perf_counter()
    if end is None:
        end = SYSTEM_CLOCK.now_datetime().astimezone(WIB).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=days)
    shop = generate_shop(seed=seed, now=end)
    simulator = Simulator(shop, n_visitors=visitors, seed=seed, start=start)
    out.mkdir(parents=True, exist_ok=True)
    n_items = write_jsonl(shop.all_items(), out / CATALOG_FILE)
    write_jsonl(
        ({"visitor_id": visitor.visitor_id, "hidden_type": visitor.hidden_type} for visitor in simulator.visitors),
        out / VISITORS_FILE,
    )

    span = max(1.0, (end - start).total_seconds())

    def reporting(events: Iterator[Event]) -> Iterator[Event]:
        # Report every few thousand events: a callback per event would cost more than the writing.
        for count, event in enumerate(events, start=1):
            if on_progress is not None and count % 5000 == 0:
                on_progress(min(1.0, (event.ts - start.timestamp()) / span))
            yield event

    n_events = write_jsonl(reporting(simulator.history(days)), out / EVENTS_FILE)
    if on_progress is not None:
        on_progress(1.0)
    return GeneratedDataset(
        out=out,
        catalog_items=n_items,
        events=n_events,
        visitors=visitors,
        days=days,
        start=start,
        end=end,
        seconds=time.perf_counter() - began,
    )


def _parse_end(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError as error:
        raise typer.BadParameter("expected a date like 2025-03-31") from error
    # The history ends at the start of that day in WIB (UTC+7).
    return datetime(day.year, day.month, day.day, tzinfo=WIB)


@shop_app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the files to.")] = Path("data/demo"),
    visitors: Annotated[int, typer.Option("--visitors", min=1, help="Number of simulated visitors.")] = 1000,
    days: Annotated[int, typer.Option("--days", min=1, help="Days of history.")] = 30,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same files).")] = 7,
    end: Annotated[
        str | None, typer.Option("--end", help="History ends at this date's midnight WIB (default: today).")
    ] = None,
) -> None:
    """Write catalog.jsonl, events.jsonl.gz and visitors.jsonl for the demo shop."""
    with Progress(
        TextColumn("[bold]Simulating visitors"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("simulate", total=1.0)
        dataset = generate_dataset(
            out,
            visitors=visitors,
            days=days,
            seed=seed,
            end=_parse_end(end),
            on_progress=lambda fraction: progress.update(task, completed=fraction),
        )
    console.print(
        f"Wrote {dataset.catalog_items:,} catalog items and {dataset.events:,} events "
        f"({dataset.visitors:,} visitors, {dataset.days} days to {dataset.end.date()}) "
        f"to {dataset.out} in {dataset.seconds:.1f} s"
    )


def simulate_messages_command(
    out: Annotated[Path, typer.Option(help="Where to write catalog.jsonl and events.jsonl.gz")] = Path("data/messages"),
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="SELARAS_DATA_DIR", help="A fresh data dir for the simulation")
    ] = Path("data/message-sim"),
    visitors: int = 1000,
    history_days: int = 14,
    message_days: int = 14,
    train_after_days: Annotated[int | None, typer.Option(help="Train and serve the model after N message days")] = None,
    control_rate: float = 0.05,
    seed: int = 7,
) -> None:
    """Simulate message decisions (with exploration and a control group) and reactions on the demo shop."""
    from services.common.storage import open_store
    from services.demo.message_sim import MessageSimConfig, simulate_messages
    from services.messages.settings import MessageSettings
    from services.recommend.settings import RecommendSettings

    os.environ["SELARAS_DATA_DIR"] = str(data_dir.resolve())
    settings = RecommendSettings(data_dir=data_dir)
    store = open_store(settings)
    try:
        if store.log_length():
            console.print(
                f"[red]{data_dir} already holds events:[/] simulate into a fresh --data-dir "
                "(and, with REDIS_URL, a fresh SELARAS_NAMESPACE and SELARAS_FEAST_PROJECT)"
            )
            raise typer.Exit(2)
    finally:
        store.close()
    config = MessageSimConfig(
        visitors=visitors,
        history_days=history_days,
        message_days=message_days,
        seed=seed,
        train_after_days=train_after_days,
        policy=MessageSettings(win_back_after_days=7.0, control_rate=control_rate),
    )
    with console.status("simulating"):
        result = simulate_messages(settings, config, out_dir=out)
    console.print(
        f"{result.decisions:,} decisions ({result.logged:,} logged, {result.sent:,} sent), {result.events:,} events "
        f"in {result.seconds:.0f} s; answers {result.answers}"
    )
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")
    # Train on the first half of the message days, evaluate on the second (held out).
    split = (result.first_decision + timedelta(days=message_days // 2)).replace(hour=0).isoformat()
    console.print(
        f"next:\n  selaras train-messages --data-dir {data_dir} --until {split}\n"
        f"  selaras evaluate messages {result.files.get('events')} --data-dir {data_dir} --since {split}"
    )


# ------------------------------------------------------------------------------------------------
# selaras simulate-ab
# ------------------------------------------------------------------------------------------------

# The demo world's two ranker versions for `simulate-ab --arms`: the "lite" one is trained first, on 500 training
# queries (the default takes up to 12,000) with a 4-leaf model of 20 boosting rounds; the "full" one (TrainConfig's
# defaults) is the newest and serves. The full one gained +8.7% CTR over it on the demo world; a lite one on 1,500
# queries with 7 leaves was as good as the full one (docs/experiments.md).
LITE_RANKER: Final[dict[str, Any]] = {"max_queries": 500, "num_boost_round": 20, "num_leaves": 4}
WORLD_RANKERS: Final = ("lite", "full")


def simulate_ab_command(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="SELARAS_DATA_DIR", help="Where Selaras keeps its data.")
    ] = Path("data"),
    days: Annotated[int, typer.Option(help="Simulated days per experiment.", min=1, max=60)] = 7,
    mode: Annotated[str, typer.Option(help="ab, aa or both (A/B then A/A); --arms runs model vs model.")] = "both",
    arms: Annotated[
        str | None,
        typer.Option(
            "--arms",
            help="Model vs model: model:<v1>,model:<v2> (ranker versions of the demo world; control is ranked by "
            "v1, treatment by v2). An unknown version lists the available ones.",
        ),
    ] = None,
    pre_days: Annotated[
        int,
        typer.Option(
            "--pre-days",
            help="Days every visitor is served outside any experiment before it starts (CUPED's pre-period).",
            min=0,
            max=30,
        ),
    ] = 7,
    visitors: Annotated[int, typer.Option(help="Visitors of the demo world.", min=50)] = 400,
    history_days: Annotated[int, typer.Option(help="Days of history before the experiment.", min=3)] = 14,
    seed: int = 7,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the demo world even if it exists.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the reports as JSON here.")] = None,
) -> None:
    """Run an A/B (personalized vs generic) and an A/A experiment, or a model vs model test (--arms), on the
    demo shop and print the reports.

    Uses REDIS_URL when set, embedded stores otherwise. The demo world (shop, history, two ranker versions) is
    built once under DATA_DIR/simulate-ab/world and reused; every run works on a fresh copy of it."""
    import json
    import shutil
    import uuid

    from rich.console import Console

    from services.common.settings import CommonSettings
    from services.demo.ab_report import print_report, summary
    from services.demo.simulate_ab import ArmsError, Mode, parse_model_arms, run_simulation
    from services.demo.world import build_world

    if mode not in ("ab", "aa", "both"):
        raise typer.BadParameter("mode must be ab, aa or both")
    models: tuple[str, ...] = ()
    if arms is not None:
        if mode != "both":
            raise typer.BadParameter("--arms runs a model vs model test: leave --mode out")
        try:
            models = parse_model_arms(arms)
        except ArmsError as exc:
            raise typer.BadParameter(str(exc), param_hint="--arms") from None
    chosen: Mode = "models" if models else "ab" if mode == "ab" else "aa" if mode == "aa" else "both"
    # The report tables need about 120 columns; narrower (or piped) output would truncate the numbers.
    wide = Console(width=max(Console().width, 120))
    root = data_dir / "simulate-ab"
    redis_url = os.environ.get("REDIS_URL") or None
    world_settings = CommonSettings(
        data_dir=root / "world", redis_url=redis_url, namespace="simab_world", feast_project="simab_world"
    )
    marker = root / "world.json"
    # The rankers' training settings are part of the world: changing them rebuilds it.
    wanted = {"visitors": visitors, "days": history_days, "seed": seed, "rankers": {"lite": LITE_RANKER, "full": {}}}
    current = json.loads(marker.read_text()) if marker.exists() else {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn()) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, fraction: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=1.0)
            bar.update(tasks[stage], completed=min(max(fraction, 0.0), 1.0))

        if rebuild or current.get("params") != wanted:
            shutil.rmtree(root / "world", ignore_errors=True)
            if redis_url:
                drop_namespace(world_settings)
            world = build_world(
                world_settings, visitors=visitors, days=history_days, seed=seed, train=False, progress=progress
            )
            simulator, end = world.simulator, world.end
            rankers = train_world_rankers(world_settings, seed, progress)
            current = {"params": wanted, "end": end.isoformat(), "rankers": rankers}
            marker.write_text(json.dumps(current))
        else:
            # The world is deterministic given its parameters and end: rebuild the shop and visitors only.
            end = datetime.fromisoformat(current["end"])
            shop = generate_shop(seed=seed, now=end)
            simulator = Simulator(shop, n_visitors=visitors, seed=seed, start=end - timedelta(days=history_days))
        # A fresh namespace and Feast project per run, so no state of an earlier run leaks into this one.
        run_name = f"simab_{uuid.uuid4().hex[:8]}"
        target = CommonSettings(
            data_dir=root / "runs" / run_name, redis_url=redis_url, namespace=run_name, feast_project=run_name
        )
        try:
            results = run_simulation(
                world_settings,
                simulator,
                end,
                target,
                days=days,
                mode=chosen,
                progress=progress,
                models=models,
                pre_days=pre_days,
            )
        except ArmsError as exc:
            results = []
            problem = str(exc)
        else:
            problem = ""
        finally:
            if redis_url:
                drop_namespace(target)
                teardown_features(target)
            shutil.rmtree(target.data_dir, ignore_errors=True)
    versions = ", ".join(f"{name} model:{version}" for name, version in current.get("rankers", {}).items())
    if problem:
        console.print(f"[red]{problem}[/]")
        console.print(f"  ranker versions of the demo world: {versions}", highlight=False)
        raise typer.Exit(2)
    console.print(f"ranker versions of the demo world: {versions}", highlight=False)
    labels = {
        "ab": "A/B: personalized vs generic",
        "aa": "A/A: personalized vs personalized",
        "models": "model vs model",
    }
    for result in results:
        title = f"{labels[result.mode]} ({result.key}, {days} simulated days after a {pre_days}-day pre-period)"
        print_report(wide, result.report, title, result.arm_models)
        if result.stats.models and result.arm_models:
            served = ", ".join(f"{k}: {v:,}" for k, v in sorted(result.stats.models.items()))
            wide.print(f"answers by arm and ranker version: {served}")
            ranked = [served.split(":", 1) for served in result.stats.models]
            stand_ins = [f"{arm}:{v}" for arm, v in ranked if arm in result.arm_models and v != result.arm_models[arm]]
            if stand_ins:
                wide.print(f"[yellow]some answers were not ranked by their arm's version: {', '.join(stand_ins)}[/]")
        wide.print(
            f"{result.stats.sessions:,} sessions, {result.stats.requests:,} recommendation requests, "
            f"{result.stats.events:,} events\n"
        )
    if json_out:
        json_out.write_text(json.dumps([{"summary": summary(r), "report": r.report} for r in results], indent=2))


def train_world_rankers(settings: Any, seed: int, progress: Callable[[str, float], None]) -> dict[str, str]:
    """The demo world's ranker versions, "lite" first and "full" last (the newest serves): name -> version."""
    from services.demo.simulate_ab import train_ranker
    from services.recommend.training.train import TrainConfig

    configs = {"lite": TrainConfig(seed=seed, **LITE_RANKER), "full": TrainConfig(seed=seed)}
    versions: dict[str, str] = {}
    for name in WORLD_RANKERS:
        stage = f"training the {name} ranker"

        def report(_: str, fraction: float, stage: str = stage) -> None:
            progress(stage, fraction)

        versions[name], _ = train_ranker(settings, configs[name], report)
        progress(stage, 1.0)
    return versions


def drop_namespace(settings: Any) -> None:
    """Remove a namespace's keys (Redis mode): the world before a rebuild, a run after it."""
    from services.common.storage import make_redis_client

    if not settings.redis_url:
        return
    client = make_redis_client(settings.redis_url, settings.redis_cluster, 5.0)
    try:
        for pattern in (f"{settings.namespace}:*", f"{{{settings.namespace}:*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
    finally:
        client.close()


def teardown_features(settings: Any) -> None:
    """Drop a run's Feast online rows (Redis mode); a failure only leaves unused keys behind."""
    from services.features.store import open_feature_store

    try:
        open_feature_store(settings).teardown()
    except Exception as exc:
        log.warning("could not tear down the run's feature store: %s", type(exc).__name__)


@dataclass(frozen=True)
class DemoTraffic:
    days: int
    sessions: int
    requests: int
    events: int
    report: dict[str, Any]  # the experiment's report after the last simulated day
    seconds: float


def drive_demo_experiment(
    settings: CommonSettings,
    simulator: Simulator,
    start: datetime,
    days: int,
    experiments_file: Path,
    progress: Callable[[float], None] | None = None,
) -> DemoTraffic:
    """Enable the shipped experiment from `start` and send `days` simulated days of the demo's visitors through
    both services (in-process, on a clock the simulation moves): every session asks for the home slots and reacts
    to what its arm showed, as in `selaras simulate-ab`, so the experiment has exposures, clicks and purchases.

    The stored experiments configuration (which wins over the file once stored) becomes the shipped one with
    this experiment enabled and started at `start`; the services `selaras demo` starts afterwards follow it."""
    from services.common.clock import FixedClock
    from services.common.storage import open_store
    from services.demo.simulate_ab import DEFAULT_SLOTS, fetch_report, in_process_services, simulate
    from services.experiments.config import load_config
    from services.experiments.config_store import ExperimentConfigStore
    from services.profile.settings import ProfileSettings
    from services.recommend.settings import RecommendSettings

    began = time.perf_counter()
    # The in-process services run on Starlette's test client, which warns on import that it will need another
    # HTTP package one day: noise in the demo's output, and nothing a newcomer can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import starlette.testclient  # noqa: F401
    data = yaml.safe_load(experiments_file.read_text())
    experiments = [e for e in data.get("experiments", []) if e.get("key") == DEMO_EXPERIMENT]
    if not experiments:
        raise ValueError(f"{experiments_file} has no experiment {DEMO_EXPERIMENT!r} for the demo to run")
    experiments[0].update(enabled=True, start=start.isoformat(), end=None)
    demo_file = settings.data_dir / "demo-experiments.yaml"
    demo_file.parent.mkdir(parents=True, exist_ok=True)
    demo_file.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    store = open_store(settings)
    try:
        config = load_config(demo_file)
        ExperimentConfigStore(store).seed(config, force=True, actor="selaras demo", now=start.timestamp())
    finally:
        store.close()
    shared = settings.model_dump(include={"data_dir", "redis_url", "redis_cluster", "namespace", "feast_project"})
    # In-process and private: no keys, whatever SELARAS_API_KEYS says; quiet logs (every request would show).
    private: dict[str, Any] = {**shared, "api_keys": "", "log_level": "WARNING"}
    profile_settings = ProfileSettings(**private, aggregator_idle_s=0.01)
    # The simulation reloads the item cache after each simulated day; no background refresh in between.
    recommend_settings = RecommendSettings(**private, experiments_file=demo_file, refresh_interval_s=24 * 3600.0)
    with in_process_services(profile_settings, recommend_settings, clock=FixedClock(start)) as services:
        stats = simulate(
            services,
            simulator,
            start,
            days,
            "demo",
            slots=DEFAULT_SLOTS,
            progress=(lambda _, fraction: progress(fraction)) if progress else None,
        )
        report = fetch_report(services, DEMO_EXPERIMENT)
    return DemoTraffic(days, stats.sessions, stats.requests, stats.events, report, time.perf_counter() - began)


def traffic_summary(traffic: DemoTraffic) -> str:
    """One line for the demo's output: visitors and the primary metric per arm, and the uplift with its CI."""
    report = traffic.report
    metric = report["primary_metric"]
    arms = ", ".join(
        f"{arm['name']} {arm['n']:,.0f} visitors, {metric} {arm['metrics'][metric]['mean'] or 0:.2%}"
        for arm in report["arms"]
    )
    result = next((r for r in report["results"] if r["metric"] == metric), None)
    uplift = ""
    if result is not None and None not in (result["uplift"], result["ci_lower"], result["ci_upper"]):
        uplift = f"; uplift {result['uplift']:+.1%} (95% CI {result['ci_lower']:+.1%} … {result['ci_upper']:+.1%})"
    return (
        f"experiment {report['key']}: {traffic.days} simulated days, {traffic.sessions:,} sessions, "
        f"{traffic.events:,} events in {traffic.seconds:.0f} s; {arms}{uplift}"
    )
