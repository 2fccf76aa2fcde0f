"""How visitors moved between personas from one model to the next (the refresh report)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from services.profile.personas.model import PersonaModel
from services.profile.personas.traits import behaviour_matrix

# --------------------------------------------------------------------------------------------- movement


def movement_report(
    old_model: PersonaModel, new_model: PersonaModel, rows: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    """How the same visitors move between personas from one model to the next.

    Returns {"n", "transitions": {old_id: {new_id: count}}, "stayed", "stayed_share",
    "stayed_share_by_old": {old_id: share}, "retired_ids", "new_ids"}. Ids are strings so the report is JSON.
    """
    matrix, names = behaviour_matrix(rows)
    if old_model.trait_names != names or new_model.trait_names != names:
        raise ValueError("persona models were fitted on other traits; refit them with this code version")
    old_ids = old_model.assign_matrix(matrix)
    new_ids = new_model.assign_matrix(matrix)
    transitions: dict[str, dict[str, int]] = {}
    pairs, counts = np.unique(np.stack([old_ids, new_ids], axis=1), axis=0, return_counts=True)
    for (o, w), count in zip(pairs.tolist(), counts.tolist(), strict=True):
        transitions.setdefault(str(o), {})[str(w)] = int(count)
    n = len(rows)
    stayed_mask = old_ids == new_ids
    stayed_by_old = {str(pid): float(stayed_mask[old_ids == pid].mean()) for pid in np.unique(old_ids).tolist()}
    return {
        "n": n,
        "transitions": transitions,
        "stayed": int(stayed_mask.sum()),
        "stayed_share": float(stayed_mask.mean()) if n else 0.0,
        "stayed_share_by_old": stayed_by_old,
        "retired_ids": sorted(set(old_model.persona_ids) - set(new_model.persona_ids)),
        "new_ids": sorted(set(new_model.persona_ids) - set(old_model.persona_ids)),
    }
