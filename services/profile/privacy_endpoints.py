"""Privacy routes of the profile service (erasure, export, personas)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from services.common.api import PathId
from services.common.errors import NotFound
from services.profile.deps import AdminKey, State
from services.profile.persona_jobs import persona_table
from services.profile.personas.repository import load_model, load_report

router = APIRouter()


@router.delete("/v1/profiles/{visitor_id}", responses={200: {"description": "Receipt of what was deleted"}})
def erase_profile(visitor_id: PathId, state: State, _: AdminKey) -> dict[str, Any]:
    """Erase everything kept about the visitor (log, profile, consent, online and offline features,
    recommendation records, experiment state); returns a receipt with counts per place. Idempotent."""
    return state.privacy.erase(visitor_id).to_dict()


@router.get("/v1/profiles/{visitor_id}/export", responses={404: {"description": "Nothing is kept about the visitor"}})
def export_profile(visitor_id: PathId, state: State, _: AdminKey) -> dict[str, Any]:
    """Everything kept about the visitor: consent, profile state, features, events, feature history."""
    export = state.privacy.export(visitor_id)
    sections = ("consent", "profile_state", "online_features", "events", "feature_history", "recommendations")
    if not any(export[name] for name in sections) and not any(export["other"].values()):
        raise NotFound("nothing is kept about this visitor")
    return export


@router.get("/v1/personas", responses={404: {"description": "No persona model yet"}})
def list_personas(state: State, _: AdminKey) -> dict[str, Any]:
    """The learned personas (names and descriptions in Indonesian and English, size, traits) and the last
    refresh's report: how many visitors each persona has and how visitors moved between personas."""
    store = state.repository.store
    model = load_model(store)
    if model is None:
        raise NotFound("no personas yet: run `selaras personas` once visitors have some history")
    report = load_report(store) or {}
    if report.get("version") != model.version:
        report = {}  # a report of an older model (the job was interrupted): sizes come from the fit only
    assigned = {int(k): int(v) for k, v in report.get("assigned", {}).items()} or None
    return {
        "version": model.version,
        "created_at": model.created_at,
        "k": model.k,
        "silhouette_by_k": {str(k): round(v, 4) for k, v in model.silhouette_by_k.items()},
        "n_fit": model.n_fit,
        "personas": persona_table(model, assigned),
        "retired_ids": model.retired_ids,
        "report": report or None,
    }
