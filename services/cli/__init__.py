"""`selaras`: one command with subcommands; each group lives in its own module of this package."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from services.cli import admin, experiments, exports, imports, log_admin, serve, train
from services.cli.histories import register_history_commands
from services.cli.messages import register_message_commands
from services.common.terminal import record_to_html, save_html
from services.demo.commands import shop_app, simulate_ab_command, simulate_messages_command

# DuckDB/ibis deprecation notices on every Feast offline query are noise for CLI users.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

app = typer.Typer(help="Selaras: personalization for online shops.", no_args_is_help=True, add_completion=False)
import_app = typer.Typer(
    help="Import JSON Lines or CSV files (optionally .gz) in the API's schemas.", no_args_is_help=True
)
evaluate_app = typer.Typer(help="Offline evaluation: rankings, policies and messages.", no_args_is_help=True)
export_app = typer.Typer(help="Export audiences (segment or persona members) as CSV.", no_args_is_help=True)
run_app = typer.Typer(help="Run a background process (the aggregator).", no_args_is_help=True)
admin_app = typer.Typer(help="Operations on the event log (partitions).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: create a key and its SELARAS_API_KEYS entry.", no_args_is_help=True)
experiments_app = typer.Typer(
    help="The experiments configuration stored for every replica (seeded from experiments.yaml), and the store's"
    " per-visitor index (reindex, after an upgrade).",
    no_args_is_help=True,
)


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


# The order here is the order of `selaras --help`.
app.command("simulate-ab")(simulate_ab_command)
register_message_commands(app, evaluate_app)
app.command("simulate-messages")(simulate_messages_command)
app.command()(serve.serve)
app.command()(train.train)
app.command()(serve.demo)
app.command()(admin.personas)
app.command()(admin.retention)
app.command()(log_admin.archive)
app.command()(log_admin.compact)
app.add_typer(shop_app, name="shop")
app.add_typer(import_app, name="import")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(export_app, name="export")
app.add_typer(run_app, name="run")
app.add_typer(keys_app, name="keys")
app.add_typer(admin_app, name="admin")
app.add_typer(experiments_app, name="experiments")
import_app.command("events")(imports.import_events_command)
import_app.command("customers")(imports.import_customers_command)
import_app.command("catalog")(imports.import_catalog_command)
register_history_commands(import_app, evaluate_app)
evaluate_app.command("ranking")(train.evaluate_ranking_command)
evaluate_app.command("item2item")(train.evaluate_item2item_command)
evaluate_app.command("policy")(train.evaluate_policy_command)
export_app.command("audience")(exports.export_audience)
export_app.command("recommendations")(exports.export_recommendations)
run_app.command("aggregator")(serve.run_aggregator)
keys_app.command("new")(admin.keys_new)
admin_app.command("repartition")(log_admin.repartition)
admin_app.command("index-offline")(log_admin.index_offline)
admin_app.command("index-recommendations")(log_admin.index_recommendations)
experiments_app.command("seed")(experiments.seed)
experiments_app.command("reindex")(experiments.reindex)
