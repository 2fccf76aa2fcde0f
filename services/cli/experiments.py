"""`selaras experiments ...`: the stored experiments configuration (services/experiments/config_store.py) and
the experiment store's per-visitor index (services/experiments/store/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import DataDir, console, err_console, use_data_dir


def seed(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="An experiments.yaml to store.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the stored configuration (the store wins otherwise).")
    ] = False,
    data_dir: DataDir = Path("data"),
) -> None:
    """Store FILE as the experiments configuration every replica follows (within seconds, no restart).

    Without --force the file is stored only when the store holds none: once stored, changes made through the
    admin API are kept. The change is audited (GET /v1/experiments/audit) as made by `cli`."""
    use_data_dir(data_dir)
    from services.common.clock import clock_for
    from services.common.storage import open_store
    from services.experiments.config import ExperimentConfigError, load_config
    from services.experiments.config_store import ExperimentConfigStore
    from services.recommend.settings import RecommendSettings

    try:
        config = load_config(file)
    except ExperimentConfigError as exc:
        err_console.print(str(exc))
        raise typer.Exit(2) from exc
    settings = RecommendSettings(data_dir=data_dir)
    store = open_store(settings)
    try:
        now = clock_for(settings.clock_start).now()
        stored, wrote = ExperimentConfigStore(store).seed(config, force=force, actor="cli", now=now)
    finally:
        store.close()
    if wrote:
        console.print(f"stored {len(config.experiments)} experiments from {file} (generation {stored.generation})")
    else:
        console.print(
            f"kept the stored configuration (generation {stored.generation}, {len(stored.config.experiments)} "
            "experiments): pass --force to replace it"
        )


def reindex(data_dir: DataDir = Path("data")) -> None:
    """Index the experiment store's per-visitor data written before the indexes existed (once, after an upgrade).

    Erasure and export look a visitor up in each experiment instead of scanning the store; what an earlier
    version wrote is found only once indexed. On Redis this walks the whole database (SCAN) once; the SQLite file
    indexes itself when opened. Safe while the services run, and to run again."""
    use_data_dir(data_dir)
    from services.common.settings import CommonSettings
    from services.experiments.store import open_experiment_store

    store = open_experiment_store(CommonSettings(data_dir=data_dir))
    try:
        done = store.reindex()
    finally:
        store.close()
    console.print(
        f"{done.experiments:,} experiments known to erasure and export, "
        f"{done.exposure_records:,} exposure records indexed by visitor"
    )
