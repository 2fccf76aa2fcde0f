"""Personas learned from visitor behaviour: interpretable traits -> scaling -> KMeans -> named.

Marketers read the personas, so everything here is chosen to be explainable:
  * the clustering space is a short list of behavioural traits with plain meanings (`TRAITS`);
  * the number of personas is picked by the Davies-Bouldin index (silhouette is reported too), and every
    candidate k's scores are kept in the model;
  * names and descriptions come from the traits that set a persona's centre apart from the population,
    phrased as ratios ("3,1× lebih sering melihat produk diskon dibanding rata-rata");
  * persona ids survive a refit: new centres are matched to the previous model's (Hungarian assignment),
    so targeting rules and dashboards keyed by persona id keep their meaning.

Pure modules: no Redis/Feast/I/O beyond JSON (de)serialisation of a `PersonaModel`, except `repository.py`,
the personas' store owner (models, the job's report, visitor states and rows).
"""

from __future__ import annotations

from services.profile.personas.fit import fit_personas
from services.profile.personas.model import Persona, PersonaModel
from services.profile.personas.movement import movement_report
from services.profile.personas.traits import TRAIT_NAMES, TRAITS, active_mask, behaviour_matrix, category_group

__all__ = [
    "TRAITS",
    "TRAIT_NAMES",
    "Persona",
    "PersonaModel",
    "active_mask",
    "behaviour_matrix",
    "category_group",
    "fit_personas",
    "movement_report",
]
