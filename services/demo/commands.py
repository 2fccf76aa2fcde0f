"""The demo's commands: `selaras shop ...` (the demo shop's catalog and a simulated visitor history),
`selaras simulate-messages` (message decisions and reactions on the demo shop), and the simulated traffic that
`selaras demo` sends through the shipped experiment so /experiments shows a report with numbers."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from services.common.clock import SYSTEM_CLOCK
from services.common.context import WIB
from services.common.events import Event
from services.common.settings import CommonSettings
from services.common.terminal import console
from services.demo.shop import generate_shop
from services.demo.simulator import Simulator, write_jsonl

DEMO_EXPERIMENT = "personalized-home"  # the experiment shipped in experiments.yaml
CATALOG_FILE = "catalog.jsonl"
EVENTS_FILE = "events.jsonl.gz"
VISITORS_FILE = "visitors.jsonl"

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
