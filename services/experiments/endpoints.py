"""Experiment routes (admin API, report, dashboard page), mounted by the recommend service.

The JSON routes need an `admin` key. Changes (create, patch, promote) are compare-and-set writes of the shared
configuration record (config_store.py), applied at once on the replica that answers and within
`CONFIG_POLL_S` on the others; each is written to the audit log with the key's name.

Sticky assignment: raising coverage keeps every assigned visitor (GrowthBook ranges grow in place, see
assignment.py). Changing the weights of a running experiment would move visitors from one arm to the other, so
their outcomes would mix both treatments: it is refused (409) unless `"rebalance": true`, which also bumps
`bucket_version`: everybody is randomised afresh and the results start from zero (a new storage id). A change
of weights (and coverage) under which every arm's range contains its old one moves nobody and is accepted
(`keeps_assigned`): a ramp on an experiment running below full coverage. The arms' shares of the visitors
then differ before and after it, which the SRM check (against the current weights) may flag.

The page `/experiments` is static HTML/JS without any data in it:
it calls the JSON routes with the key the user types (kept in the tab's sessionStorage) or passes in the
URL fragment (`/experiments#key=...`, never sent to the server or written to logs).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from services.common.api import FastJSONResponse, StaticPages
from services.common.clock import wall_time
from services.common.errors import Conflict, InvalidPayload, NotFound
from services.common.models import ModelKind
from services.experiments.assignment import bucket_ranges
from services.experiments.config import ArmName, ExperimentConfig
from services.experiments.config_store import ExperimentConfigStore, StoredConfig
from services.experiments.deps import AdminKey, ExperimentsState, State
from services.experiments.runtime import ExperimentRuntime
from services.experiments.schemas import ExperimentReport
from services.experiments.targeting import ExperimentTargeting

router = APIRouter()
PAGES: Final = StaticPages(Path(__file__).resolve().parent / "static", ("experiments.js", "experiments.css"))


def experiment_of(state: ExperimentsState, key: str) -> tuple[ExperimentRuntime, ExperimentConfig]:
    runtime = state.runtime
    experiment = runtime.by_key.get(key) if runtime else None
    if runtime is None or experiment is None:
        raise NotFound(f"no experiment {key!r} is configured")
    return runtime, experiment


@router.get("/v1/experiments")
def list_experiments(state: State, _: AdminKey) -> dict[str, Any]:
    """Every configured experiment with its status, and the generation of the stored configuration (the file
    only seeds the store when it holds none)."""
    runtime = state.runtime
    if runtime is None:
        return {"experiments": [], "holdout": 0.0, "file": str(state.experiments_file), "generation": 0}
    config = runtime.config
    return {
        "experiments": [runtime.describe(e) for e in config.experiments],
        "holdout": config.holdout,
        "file": str(state.experiments_file),
        "generation": runtime.generation,
    }


class ExperimentPatch(BaseModel):
    """The fields an admin changes on a stored experiment; a field left out stays as it is (`end: null`
    clears the end)."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    enabled: bool | None = None
    start: AwareDatetime | None = None
    end: AwareDatetime | None = None
    coverage: float | None = Field(default=None, ge=0, le=1)
    weights: dict[ArmName, Annotated[float, Field(ge=0, le=1)]] | None = None
    # Who may enter from now on (`null` removes the conditions); visitors already exposed keep their arm.
    targeting: ExperimentTargeting | None = None
    # Re-randomise everybody (bucket_version + 1, results from zero): required to change a running test's weights.
    rebalance: bool = False


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arm: ArmName


def _config_store(state: ExperimentsState) -> tuple[ExperimentRuntime, ExperimentConfigStore]:
    if state.runtime is None or state.config_store is None:
        raise Conflict(
            "experiments are off on this service: start it with an experiments file (it seeds the shared store)"
        )
    return state.runtime, state.config_store


def _index_of(data: dict[str, Any], key: str) -> int:
    for i, experiment in enumerate(data["experiments"]):
        if experiment["key"] == key:
            return i
    raise NotFound(f"no experiment {key!r} is configured")


def _invalid(field: str, message: str) -> InvalidPayload:
    return InvalidPayload(f"{field}: {message}", extra={"errors": [{"field": field, "message": message}]})


def keeps_assigned(current: ExperimentConfig, weights: dict[str, float], coverage: float) -> bool:
    """Whether every arm's new bucket range contains its old one, so no assigned visitor changes arm.

    Ranges are GrowthBook's ([start, start + coverage * weight), start = the weights before the arm): with a
    coverage below 1 a ramp such as 50/50 at 40% to 40/60 at 50% keeps everybody where they are and only adds
    visitors, like raising coverage. Anything else would move visitors between arms."""
    old = bucket_ranges([arm.weight for arm in current.arms], current.coverage)
    new = bucket_ranges([weights[arm.name] for arm in current.arms], coverage)
    return all(
        lo_new <= lo_old + 1e-12 and hi_old <= hi_new + 1e-12
        for (lo_old, hi_old), (lo_new, hi_new) in zip(old, new, strict=True)
        if hi_old > lo_old
    )


def _changed(state: ExperimentsState, runtime: ExperimentRuntime, stored: StoredConfig, key: str) -> dict[str, Any]:
    # This replica serves the change at once; the others pick it up at their next poll.
    runtime.apply(stored)
    answer = runtime.describe(runtime.by_key[key])
    answer["generation"] = stored.generation
    return answer


@router.get("/v1/experiments/audit")
def experiments_audit(state: State, _: AdminKey, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Every change of the experiments configuration, newest first: who, when (business time), before/after."""
    store = state.config_store
    return {"entries": store.audit(None, limit) if store is not None else []}


CHANGE_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    404: {"description": "No experiment has this key"},
    409: {"description": "The change conflicts with the stored state (key exists, running weights, promoted)"},
}


def _check_arm_sources(state: ExperimentsState, experiment: ExperimentConfig) -> None:
    if not state.candidate_sources:
        return
    for n, arm in enumerate(experiment.arms):
        unknown = sorted(set(arm.candidate_sources or ()) - set(state.candidate_sources))
        if unknown:
            known = ", ".join(state.candidate_sources)
            raise _invalid(f"arms.{n}.candidate_sources", f"unknown candidate sources {unknown}; known: {known}")


def _check_arm_models(state: ExperimentsState, experiment: ExperimentConfig) -> None:
    named = [(n, arm.model) for n, arm in enumerate(experiment.arms) if arm.model is not None]
    if not named or state.models is None:
        return
    index = state.models.index(ModelKind.RANKER)
    for n, version in named:
        if index.get(version) is None:
            known = ", ".join(v.version for v in index.versions[-5:]) or "none"
            raise _invalid(f"arms.{n}.model", f"no ranker version {version!r} in the model registry (newest: {known})")


@router.post("/v1/experiments", status_code=201, responses={409: CHANGE_ERRORS[409]})
def create_experiment(experiment: ExperimentConfig, state: State, actor: AdminKey) -> dict[str, Any]:
    """Add an experiment to the shared configuration (409 when the key exists; 422 naming the arm when an arm
    names a ranker version the model registry does not hold: a typo would silently serve the production model)."""
    runtime, store = _config_store(state)
    _check_arm_models(state, experiment)
    _check_arm_sources(state, experiment)

    def add(data: dict[str, Any]) -> dict[str, Any]:
        if any(e["key"] == experiment.key for e in data["experiments"]):
            raise Conflict(f"experiment {experiment.key!r} exists: change it with PATCH")
        data["experiments"].append(experiment.model_dump(mode="json"))
        return data

    stored = store.change(add, actor=actor, now=state.clock.now(), action="create", key=experiment.key)
    return _changed(state, runtime, stored, experiment.key)


@router.patch("/v1/experiments/{key}", responses=CHANGE_ERRORS)
def change_experiment(key: str, patch: ExperimentPatch, state: State, actor: AdminKey) -> dict[str, Any]:
    """Enable or disable, (re)schedule start and end, change coverage, weights, targeting or description."""
    runtime, store = _config_store(state)
    given = patch.model_fields_set
    now = state.clock.now()

    def edit(data: dict[str, Any]) -> dict[str, Any]:
        experiment = data["experiments"][_index_of(data, key)]
        current = ExperimentConfig.model_validate(experiment)
        for field in ("description", "enabled", "coverage"):
            if field in given and getattr(patch, field) is None:
                raise _invalid(field, "must not be null")
        for field in ("description", "enabled", "coverage", "start", "end"):
            if field in given:
                value = getattr(patch, field)
                experiment[field] = value.isoformat() if isinstance(value, datetime) else value
        if patch.weights is not None:
            unknown = sorted(set(patch.weights) - set(current.arm_names))
            if unknown:
                raise _invalid(f"weights.{unknown[0]}", f"no arm {unknown[0]!r} in {current.arm_names}")
            weights = {arm.name: patch.weights.get(arm.name, arm.weight) for arm in current.arms}
            if not 0.99 <= sum(weights.values()) <= 1.01:
                raise _invalid("weights", f"arm weights must sum to 1, got {sum(weights.values()):g}")
            moved = any(abs(weights[arm.name] - arm.weight) > 1e-12 for arm in current.arms)
            coverage = patch.coverage if patch.coverage is not None else current.coverage
            if (
                moved
                and current.status(now) == "running"
                and not patch.rebalance
                and not keeps_assigned(current, weights, coverage)
            ):
                raise Conflict(
                    f"experiment {key!r} is running: new weights would move assigned visitors between arms and mix"
                    ' their results; send "rebalance": true to re-randomise everybody and start the results from'
                    " zero (bucket_version + 1), or stop it first (a change that keeps every arm's range, e.g."
                    " with a coverage below 1, is accepted as it is)"
                )
            for arm in experiment["arms"]:
                arm["weight"] = weights[arm["name"]]
        if "targeting" in given:
            experiment["targeting"] = patch.targeting.model_dump(mode="json") if patch.targeting else None
        if patch.rebalance:
            experiment["bucket_version"] = current.bucket_version + 1
        return data

    stored = store.change(edit, actor=actor, now=now, action="change", key=key)
    return _changed(state, runtime, stored, key)


@router.post("/v1/experiments/{key}/promote", responses=CHANGE_ERRORS)
def promote_arm(key: str, promotion: Promotion, state: State, actor: AdminKey) -> dict[str, Any]:
    """End the experiment and record `arm` as the winner; an arm that names a ranker version pins it as the
    production ranker in the model registry (every replica follows the pin)."""
    runtime, store = _config_store(state)
    now = state.clock.now()
    # Checked against the stored record, not this replica's view (which may be a poll behind a change).
    stored_now = store.load()
    current = next((e for e in stored_now.config.experiments if e.key == key), None) if stored_now else None
    if current is None:
        raise NotFound(f"no experiment {key!r} is configured")
    arm = next((a for a in current.arms if a.name == promotion.arm), None)
    if arm is None:
        raise _invalid("arm", f"no arm {promotion.arm!r} in {current.arm_names}")
    if current.winner is not None:
        raise Conflict(f"experiment {key!r} already promoted arm {current.winner!r}")
    if current.start is not None and current.start.timestamp() >= now:
        raise Conflict(f"experiment {key!r} has not started: there is nothing to promote yet")
    if arm.model is not None:
        if state.models is None:
            raise Conflict("this service has no model registry to pin the arm's ranker version in")
        # Pinned first: if the version is unknown (404) the experiment stays as it is.
        state.models.set_production(ModelKind.RANKER, arm.model, wall_time())

    def edit(data: dict[str, Any]) -> dict[str, Any]:
        experiment = data["experiments"][_index_of(data, key)]
        if experiment.get("winner") is not None:
            raise Conflict(f"experiment {key!r} already promoted arm {experiment['winner']!r}")
        experiment["winner"] = arm.name
        end = experiment.get("end")
        if end is None or datetime.fromisoformat(end).timestamp() > now:
            experiment["end"] = datetime.fromtimestamp(now, tz=UTC).isoformat()
        return data

    stored = store.change(edit, actor=actor, now=now, action="promote", key=key)
    answer = _changed(state, runtime, stored, key)
    answer["pinned_model"] = arm.model
    return answer


@router.get("/v1/experiments/{key}/audit", responses={404: CHANGE_ERRORS[404]})
def experiment_audit(
    key: str, state: State, _: AdminKey, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """The changes of one experiment, newest first."""
    store = state.config_store
    entries = store.audit(key, limit) if store is not None else []
    if not entries and (state.runtime is None or key not in state.runtime.by_key):
        raise NotFound(f"no experiment {key!r} is configured")
    return {"key": key, "entries": entries}


@router.get("/v1/experiments/{key}")
def get_experiment(key: str, state: State, _: AdminKey) -> dict[str, Any]:
    """One experiment's configuration and status."""
    runtime, experiment = experiment_of(state, key)
    return runtime.describe(experiment)


# The report is served as built (report.py, plain data through the fast JSON encoder); `response_model` documents
# its shape in the OpenAPI schema, and tests/experiments/test_report_schema.py validates real reports against it.
@router.get("/v1/experiments/{key}/report", response_model=ExperimentReport, responses={404: CHANGE_ERRORS[404]})
async def experiment_report(key: str, state: State, _: AdminKey) -> Response:
    """Per-arm means, uplift with fixed-horizon and always-valid intervals, the CUPED-adjusted comparison with its
    variance reduction beside them, p-values, SRM, breakdowns by slot and persona, the timeline and a verdict."""
    runtime, experiment = experiment_of(state, key)
    report = await run_in_threadpool(runtime.report, experiment.key)
    return FastJSONResponse(report)


@router.get("/experiments", include_in_schema=False)
def experiments_page() -> Response:
    return PAGES.response("experiments.html")


@router.get("/experiments/assets/{name}", include_in_schema=False)
def experiments_asset(name: str) -> Response:
    return PAGES.asset(name)
