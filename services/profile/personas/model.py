"""The persona model: its personas (names, descriptions, top traits), scaler, centroids and assignment."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from services.profile.personas.traits import MODEL_FORMAT, FloatArray, IntArray, TopTrait, behaviour_matrix, standardize

# --------------------------------------------------------------------------------------------- model


@dataclass
class Persona:
    persona_id: int
    name_id: str
    name_en: str
    description_id: str
    description_en: str
    size: int
    share: float
    top_traits: list[TopTrait]


@dataclass
class PersonaModel:
    """A fitted persona model: scaler, centres (in scaled space) and the personas they stand for.

    `centres[i]` belongs to `personas[i]`. `retired_ids` are the previous model's ids that found no match
    in this fit; `next_id` is the first id never used by this model or its ancestors, so ids are not reused.
    """

    version: int
    created_at: str
    k: int
    silhouette_by_k: dict[int, float]
    trait_names: list[str]
    log_traits: list[bool]
    center: list[float]
    scale: list[float]
    clip: float
    centres: list[list[float]]
    personas: list[Persona]
    retired_ids: list[int] = field(default_factory=list)
    next_id: int = 1
    n_fit: int = 0
    seed: int = 0
    # The criterion that chose k (lower is better); silhouette is kept for the report.
    davies_bouldin_by_k: dict[int, float] = field(default_factory=dict)
    _centres: FloatArray = field(init=False, repr=False, compare=False)
    _centre_sq: FloatArray = field(init=False, repr=False, compare=False)
    _ids: IntArray = field(init=False, repr=False, compare=False)
    _center: FloatArray = field(init=False, repr=False, compare=False)
    _scale: FloatArray = field(init=False, repr=False, compare=False)
    _log: npt.NDArray[np.bool_] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Arrays are cached once so that assigning one visitor is a few small numpy ops (well under 0.2 ms).
        self._centres = np.asarray(self.centres, dtype=np.float64)
        self._centre_sq = (self._centres**2).sum(axis=1)
        self._ids = np.array([p.persona_id for p in self.personas], dtype=np.int64)
        self._center = np.asarray(self.center, dtype=np.float64)
        self._scale = np.asarray(self.scale, dtype=np.float64)
        self._log = np.asarray(self.log_traits, dtype=bool)
        if self._centres.shape != (len(self.personas), len(self.trait_names)):
            raise ValueError("persona model is inconsistent: centres do not match personas x traits")

    @property
    def persona_ids(self) -> list[int]:
        return [p.persona_id for p in self.personas]

    def persona(self, persona_id: int) -> Persona:
        for p in self.personas:
            if p.persona_id == persona_id:
                return p
        raise KeyError(persona_id)

    def transform(self, matrix: FloatArray) -> FloatArray:
        """Trait matrix -> scaled clustering space (log1p where flagged, robust scaling, clip, NaN -> 0)."""
        return standardize(matrix, self._log, self._center, self._scale, self.clip)

    def assign_matrix(self, matrix: FloatArray) -> IntArray:
        """Persona id of each row of a trait matrix (nearest centre in scaled space)."""
        z = self.transform(matrix)
        # |z - c|^2 = |z|^2 - 2 z.c + |c|^2; |z|^2 is the same for every centre, so it is dropped.
        distances = self._centre_sq[None, :] - 2.0 * (z @ self._centres.T)
        return self._ids[np.argmin(distances, axis=1)]

    def assign(self, rows: Sequence[Mapping[str, object]]) -> IntArray:
        """Persona id for each visitor row (any activity level; unknown traits count as typical)."""
        matrix, names = behaviour_matrix(rows)
        if names != self.trait_names:
            raise ValueError("persona model was fitted on other traits; refit it with this code version")
        return self.assign_matrix(matrix)

    def to_json(self) -> str:
        data = {
            "format": MODEL_FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "k": self.k,
            "silhouette_by_k": {str(k): v for k, v in self.silhouette_by_k.items()},
            "davies_bouldin_by_k": {str(k): v for k, v in self.davies_bouldin_by_k.items()},
            "trait_names": self.trait_names,
            "log_traits": self.log_traits,
            "center": self.center,
            "scale": self.scale,
            "clip": self.clip,
            "centres": self.centres,
            "personas": [asdict(p) for p in self.personas],
            "retired_ids": self.retired_ids,
            "next_id": self.next_id,
            "n_fit": self.n_fit,
            "seed": self.seed,
        }
        # Python's float repr round-trips exactly, so a reloaded model assigns identically.
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PersonaModel:
        data = json.loads(text)
        if data.get("format") != MODEL_FORMAT:
            raise ValueError(f"unsupported persona model format {data.get('format')!r}")
        personas = [
            Persona(
                persona_id=int(p["persona_id"]),
                name_id=str(p["name_id"]),
                name_en=str(p["name_en"]),
                description_id=str(p["description_id"]),
                description_en=str(p["description_en"]),
                size=int(p["size"]),
                share=float(p["share"]),
                top_traits=[
                    TopTrait(
                        trait=str(t["trait"]),
                        value=float(t["value"]),
                        population_mean=float(t["population_mean"]),
                        ratio=float(t["ratio"]),
                    )
                    for t in p["top_traits"]
                ],
            )
            for p in data["personas"]
        ]
        return cls(
            version=int(data["version"]),
            created_at=str(data["created_at"]),
            k=int(data["k"]),
            silhouette_by_k={int(k): float(v) for k, v in data["silhouette_by_k"].items()},
            davies_bouldin_by_k={int(k): float(v) for k, v in data.get("davies_bouldin_by_k", {}).items()},
            trait_names=[str(n) for n in data["trait_names"]],
            log_traits=[bool(b) for b in data["log_traits"]],
            center=[float(v) for v in data["center"]],
            scale=[float(v) for v in data["scale"]],
            clip=float(data["clip"]),
            centres=[[float(v) for v in c] for c in data["centres"]],
            personas=personas,
            retired_ids=[int(i) for i in data["retired_ids"]],
            next_id=int(data["next_id"]),
            n_fit=int(data["n_fit"]),
            seed=int(data["seed"]),
        )
