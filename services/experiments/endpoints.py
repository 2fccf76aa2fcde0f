"""Experiment routes (admin API, report, dashboard page), mounted by the recommend service.

The JSON routes need an `admin` key. The page `/experiments` is static HTML/JS without any data in it:
it calls the JSON routes with the key the user types (kept in the tab's sessionStorage) or passes in the
URL fragment (`/experiments#key=...`, never sent to the server or written to logs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from services.common.api import FastJSONResponse
from services.common.errors import NotFound
from services.experiments.config import ExperimentConfig
from services.experiments.deps import AdminKey, ExperimentsState, State
from services.experiments.runtime import ExperimentRuntime

router = APIRouter()
STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
ASSETS: Final = {
    "experiments.js": "text/javascript; charset=utf-8",
    "experiments.css": "text/css; charset=utf-8",
}
# The page only talks to this service and runs only its own script.
PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def experiment_of(state: ExperimentsState, key: str) -> tuple[ExperimentRuntime, ExperimentConfig]:
    runtime = state.runtime
    experiment = runtime.by_key.get(key) if runtime else None
    if runtime is None or experiment is None:
        raise NotFound(f"no experiment {key!r} is configured")
    return runtime, experiment


@router.get("/v1/experiments")
def list_experiments(state: State, _: AdminKey) -> dict[str, Any]:
    """Every configured experiment with its status (read-only: experiments are configured in experiments.yaml)."""
    runtime = state.runtime
    if runtime is None:
        return {"experiments": [], "holdout": 0.0, "file": str(state.experiments_file)}
    return {
        "experiments": [runtime.describe(e) for e in runtime.config.experiments],
        "holdout": runtime.config.holdout,
        "file": str(state.experiments_file),
    }


@router.get("/v1/experiments/{key}")
def get_experiment(key: str, state: State, _: AdminKey) -> dict[str, Any]:
    """One experiment's configuration and status."""
    runtime, experiment = experiment_of(state, key)
    return runtime.describe(experiment)


@router.get("/v1/experiments/{key}/report")
async def experiment_report(key: str, state: State, _: AdminKey) -> Response:
    """Per-arm means, uplift with fixed and always-valid intervals, p-values, SRM, breakdowns and a verdict."""
    runtime, experiment = experiment_of(state, key)
    report = await run_in_threadpool(runtime.report, experiment.key)
    return FastJSONResponse(report)


def _static(name: str, media_type: str) -> Response:
    return Response((STATIC_DIR / name).read_bytes(), media_type=media_type, headers=PAGE_HEADERS)


@router.get("/experiments", include_in_schema=False)
def experiments_page() -> Response:
    return _static("experiments.html", "text/html; charset=utf-8")


@router.get("/experiments/assets/{name}", include_in_schema=False)
def experiments_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound("no such asset")
    return _static(name, media_type)
