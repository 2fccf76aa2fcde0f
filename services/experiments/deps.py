"""What the experiment routes depend on: the state the mounting app puts on `app.state.experiments` when it
starts, and the admin-key dependency. The routes do not know which service mounts them (today the recommend
service, whose `app.build_state` builds this state)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from services.common.api import require_scope
from services.common.auth import ApiKeyAuth
from services.common.clock import SYSTEM_CLOCK, Clock
from services.common.models import ModelRegistry
from services.experiments.config_store import ExperimentConfigStore
from services.experiments.runtime import ExperimentRuntime


@dataclass(frozen=True)
class ExperimentsState:
    runtime: ExperimentRuntime | None  # None: no experiments file, or it configures none
    experiments_file: Path  # shown by GET /v1/experiments, so an admin sees which file was read
    auth: ApiKeyAuth
    # The shared configuration record the admin API changes (None: experiments are read-only, from the file).
    config_store: ExperimentConfigStore | None = None
    models: ModelRegistry | None = None  # where promoting an arm that names a ranker version pins it
    clock: Clock = SYSTEM_CLOCK  # business time of audit entries and of the end a promotion sets
    # The candidate generators the mounting service has: an arm's `candidate_sources` must name them (empty: no
    # check, the service falls back to its own generators).
    candidate_sources: tuple[str, ...] = ()


def get_state(request: Request) -> ExperimentsState:
    state: ExperimentsState = request.app.state.experiments
    return state


def get_auth(request: Request) -> ApiKeyAuth:
    return get_state(request).auth


State = Annotated[ExperimentsState, Depends(get_state)]
AdminKey = Annotated[str, Depends(require_scope(get_auth, "admin"))]
