"""Run the services: `selaras serve`, `selaras run aggregator` and `selaras demo` (the demo shop end to end)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.common import (
    DataDir,
    StageProgress,
    console,
    metrics_table,
    progress_bar,
    publish_report,
    use_data_dir,
)

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


def run_aggregator(
    data_dir: DataDir = Path("data"),
    host: Annotated[str, typer.Option(help="Bind address of /healthz, /readyz and /metrics.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of /healthz, /readyz and /metrics (0: none).")] = 8003,
) -> None:
    """Fold the event log into features, as its own process (production: set PROFILE_AGGREGATOR_ENABLED=false
    on the profile API). It folds only while it holds the log's lease; started twice, one folds and the other
    waits as a standby that takes over within the lease time if the first stops or dies."""
    use_data_dir(data_dir)
    from services.common.gc_tuning import tune_for_folding
    from services.common.observability import configure_logging
    from services.common.storage import check_redis_durability
    from services.profile.aggregator.probe_server import serve_probes
    from services.profile.app import build_state, periodic_archiver
    from services.profile.settings import ProfileSettings

    settings = ProfileSettings(data_dir=data_dir)
    configure_logging(settings.log_level)
    state = build_state(settings)
    archiver = periodic_archiver(settings, state)
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
    tune_for_folding()
    aggregator.start(settings.aggregator_batch, settings.aggregator_idle_s, settings.aggregator_linger_s)
    archiver.start()  # archives the partitions this process holds, every PROFILE_ARCHIVE_INTERVAL_S
    try:
        while not stopped and aggregator.alive:
            time.sleep(0.2)
    finally:
        archiver.stop()
        aggregator.stop()  # finishes the batch in flight, then releases the lease
        if probes is not None:
            probes.shutdown()
        state.repository.close()


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


def demo(
    data_dir: DataDir = Path("data"),
    visitors: Annotated[int, typer.Option(help="Simulated visitors.")] = 1000,
    days: Annotated[int, typer.Option(help="Days of history.")] = 30,
    seed: int = 7,
    serve_services: Annotated[bool, typer.Option("--serve/--no-serve", help="Start both services at the end.")] = True,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the demo data even if it exists.")] = False,
    traffic_days: Annotated[
        int, typer.Option(min=0, max=14, help="Simulated days of visitors through the demo experiment (0: none).")
    ] = 2,
    profile_port: int = 8001,
    recommend_port: int = 8002,
) -> None:
    """Generate the demo shop, import its history, train, run the demo experiment on simulated traffic, and start
    both services (with the demo shop front) on embedded stores."""
    use_data_dir(data_dir)
    from services.common.settings import CommonSettings

    marker = data_dir / "demo.json"
    wanted = {"visitors": visitors, "days": days, "seed": seed, "traffic_days": traffic_days}
    current = json.loads(marker.read_text()) if marker.exists() else None
    if rebuild or current is None or current.get("params") != wanted:
        if data_dir.exists() and current is not None:
            import shutil

            shutil.rmtree(data_dir)
        from services.common.clock import SYSTEM_CLOCK
        from services.common.context import WIB
        from services.demo.commands import DEMO_EXPERIMENT, drive_demo_experiment, traffic_summary
        from services.demo.world import build_world
        from services.recommend.settings import RecommendSettings

        settings = CommonSettings(data_dir=data_dir, redis_url=os.environ.get("REDIS_URL"))
        console.print(f"building the demo shop in {data_dir}/ ({visitors:,} visitors, {days} days)")
        # The history ends `traffic_days` before now; the experiment's simulated days fill the time up to now.
        now = SYSTEM_CLOCK.now_datetime().astimezone(WIB).replace(minute=0, second=0, microsecond=0)
        end = now - timedelta(days=traffic_days)
        traffic = None
        with progress_bar() as bar:
            stages = StageProgress(bar)
            world = build_world(settings, visitors=visitors, days=days, seed=seed, end=end, progress=stages)
            if traffic_days:
                experiments_file = RecommendSettings().experiments_file
                traffic = drive_demo_experiment(
                    settings,
                    world.simulator,
                    world.end,
                    traffic_days,
                    experiments_file,
                    progress=lambda fraction: stages(f"visitors through the experiment {DEMO_EXPERIMENT}", fraction),
                )
            stages.finish()
        console.print(metrics_table(f"model {world.model_version} (time split)", world.train_metrics))
        if traffic is not None:
            console.print(traffic_summary(traffic), highlight=False)
        _personas_report(settings, data_dir)
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


def _personas_report(settings: Any, data_dir: Path) -> None:
    """The personas the demo world learned, as the HTML report `selaras personas` writes (/reports/personas)."""
    from services.common.clock import wall_datetime
    from services.common.storage import open_store
    from services.profile.persona_jobs import persona_table
    from services.profile.personas.repository import load_model, load_report
    from services.reports.pages import personas_report

    store = open_store(settings)
    try:
        model, report = load_model(store), load_report(store)
        if model is None or report is None:
            return  # a tiny world has too few active visitors for personas
        assigned = {int(k): v for k, v in report["assigned"].items()}
        html = personas_report(
            report,
            persona_table(model, assigned),
            model.trait_names,
            model.centres,
            "personas",
            wall_datetime().isoformat(timespec="seconds"),
        )
        publish_report(store, html, data_dir)
    finally:
        store.close()


def _run_services(data_dir: Path, profile_port: int, recommend_port: int, visitor: str, item: str) -> None:
    profile_url, recommend_url = f"http://127.0.0.1:{profile_port}", f"http://127.0.0.1:{recommend_port}"
    # The demo shop's pages come from the recommend service and send events to the profile service: its origin
    # (by either name of this machine) is allowed by CORS, next to whatever SELARAS_CORS_ORIGINS already lists.
    origins = [os.environ.get("SELARAS_CORS_ORIGINS", ""), recommend_url, f"http://localhost:{recommend_port}"]
    env = {
        **os.environ,
        "SELARAS_DATA_DIR": str(data_dir.resolve()),
        "SELARAS_CORS_ORIGINS": ",".join(o for o in origins if o),
        "RECOMMEND_DEMO_SHOP": "true",
        "RECOMMEND_DEMO_SHOP_PROFILE_URL": profile_url,
    }
    children = [
        subprocess.Popen([sys.executable, "-m", "services.cli", "serve", name, "--port", str(port)], env=env)
        for name, port in (("profile", profile_port), ("recommend", recommend_port))
    ]

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
            f"\n[bold green]Selaras is running[/]\n  demo shop:   {recommend_url}/demo-shop/\n"
            f"  experiments: {recommend_url}/experiments\n  reports:     {recommend_url}/reports/\n"
            f"  profile API:   {profile_url}/docs\n  recommend API: {recommend_url}/docs\n",
            highlight=False,
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
