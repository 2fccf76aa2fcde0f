"""Trained models of every kind, their versions, and which version serves: the one owner of stored models.

Three kinds of model reach serving: the LightGBM ranker (recommend), the message uplift model (next-best
message) and the persona model (profile aggregator). They share one rule, so a rollback works the same for all:

- Training **publishes** a version: the blob (and an optional metadata blob) first, then the kind's index,
  one small record holding every version with its digest, and the pin.
- Serving processes **watch** the index (one small read every few seconds) and load `serving` when it differs
  from what they hold. Every replica and every worker converges by itself; nobody has to call each one.
- An operator **pins** a version (`POST /v1/admin/models/{kind}/production`) to roll back or to hold a
  version while a newer one is evaluated. The pin is stored, so it survives restarts and autoscaling, and
  later trainings publish without taking it over until the pin is cleared (back to "newest").

Blobs carry a sha256 in the index: a damaged blob is refused before any parser sees it (LightGBM aborts the
whole process on some damaged model strings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import orjson

from services.common.errors import SelarasError
from services.common.storage import Namespace, Store


class ModelKind(StrEnum):
    RANKER = "ranker"
    MESSAGE = "message"
    PERSONAS = "personas"


class UnknownModelVersion(SelarasError):
    """The version was never published for this kind of model."""

    status_code = 404


class DamagedModel(ValueError):
    """A stored blob does not match the digest recorded when it was published."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    created_at: float
    sha256: str


@dataclass(frozen=True)
class ModelIndex:
    """Every published version of one kind (publish order, oldest first) and the pin, if any."""

    kind: ModelKind
    versions: tuple[ModelVersion, ...] = ()
    pinned: str | None = None
    pinned_at: float | None = None
    generation: int = 0  # bumped on every change, so a watcher can tell "something changed" from one read

    @property
    def newest(self) -> str | None:
        return self.versions[-1].version if self.versions else None

    @property
    def serving(self) -> str | None:
        """The version every process should serve: the pinned one, else the newest."""
        return self.pinned or self.newest

    def get(self, version: str) -> ModelVersion | None:
        return next((v for v in self.versions if v.version == version), None)

    def load_order(self) -> list[str]:
        """Versions to try, best first: only the pin when there is one (a rollback must not silently serve
        something else), else newest first, so a damaged or incompatible newest falls back to the one before."""
        if self.pinned:
            return [self.pinned]
        return [v.version for v in reversed(self.versions)]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "versions": [vars(v) for v in self.versions],
                "pinned": self.pinned,
                "pinned_at": self.pinned_at,
                "generation": self.generation,
            }
        )

    @classmethod
    def from_json(cls, kind: ModelKind, raw: bytes | None) -> ModelIndex:
        if not raw:
            return cls(kind)
        data = orjson.loads(raw)
        return cls(
            kind=kind,
            versions=tuple(
                ModelVersion(str(v["version"]), float(v["created_at"]), v["sha256"]) for v in data["versions"]
            ),
            pinned=data.get("pinned"),
            pinned_at=data.get("pinned_at"),
            generation=int(data.get("generation", 0)),
        )

    def public(self) -> dict[str, object]:
        """The admin API's view (digests included: operators compare them with training logs)."""
        return {
            "kind": self.kind.value,
            "versions": [vars(v) for v in reversed(self.versions)],
            "newest": self.newest,
            "pinned": self.pinned,
            "pinned_at": self.pinned_at,
            "serving": self.serving,
        }


@dataclass
class ModelRegistry:
    """Stored models of every kind. Keys: `<kind>:index`, `<kind>:<version>` (blob), `<kind>:<version>:meta`."""

    store: Store

    def index(self, kind: ModelKind) -> ModelIndex:
        return ModelIndex.from_json(kind, self.store.get(Namespace.MODELS, f"{kind}:index"))

    def publish(
        self,
        kind: ModelKind,
        version: str,
        blob: bytes,
        created_at: float,
        meta: bytes | None = None,
        companions: Mapping[str, bytes] | None = None,
    ) -> ModelIndex:
        """Store a version and make it the newest. Blobs are written before the index names them, so a
        watcher never sees a version it cannot read; publishing a version again replaces it. `companions`:
        named blobs that belong to the version (the ranker's item embeddings), read with `companion`."""
        values = {f"{kind}:{version}": blob}
        if meta is not None:
            values[f"{kind}:{version}:meta"] = meta
        for name, companion in (companions or {}).items():
            values[f"{kind}:{version}:{name}"] = companion
        self.store.put_many(Namespace.MODELS, values)
        entry = ModelVersion(version, created_at, hashlib.sha256(blob).hexdigest())

        def add(raw: bytes | None) -> bytes:
            index = ModelIndex.from_json(kind, raw)
            kept = tuple(v for v in index.versions if v.version != version)
            return replace(index, versions=(*kept, entry), generation=index.generation + 1).to_json()

        return ModelIndex.from_json(kind, self.store.update(Namespace.MODELS, f"{kind}:index", add))

    def set_production(self, kind: ModelKind, version: str | None, at: float) -> ModelIndex:
        """Pin `version` as the one every process serves, or clear the pin (None: serve the newest)."""

        def pin(raw: bytes | None) -> bytes:
            index = ModelIndex.from_json(kind, raw)
            if version is not None and index.get(version) is None:
                raise UnknownModelVersion(f"no {kind} model {version!r} was published")
            return replace(
                index, pinned=version, pinned_at=at if version else None, generation=index.generation + 1
            ).to_json()

        return ModelIndex.from_json(kind, self.store.update(Namespace.MODELS, f"{kind}:index", pin))

    def blob(self, kind: ModelKind, version: str, index: ModelIndex | None = None) -> bytes | None:
        """The version's blob, checked against its published digest (DamagedModel when it does not match);
        None when the version is unknown or its blob is gone."""
        entry = (index or self.index(kind)).get(version)
        if entry is None:
            return None
        raw = self.store.get(Namespace.MODELS, f"{kind}:{version}")
        if raw is None:
            return None
        if hashlib.sha256(raw).hexdigest() != entry.sha256:
            raise DamagedModel(f"{kind} model {version} does not match its published sha256")
        return raw

    def companion(self, kind: ModelKind, version: str, name: str) -> bytes | None:
        return self.store.get(Namespace.MODELS, f"{kind}:{version}:{name}")

    def metas(self, kind: ModelKind, versions: Sequence[str]) -> list[bytes | None]:
        return self.store.get_many(Namespace.MODELS, [f"{kind}:{v}:meta" for v in versions])

    def serving_blob(self, kind: ModelKind) -> tuple[str, bytes] | None:
        """The serving version and its blob, for readers that need the model once (reports, exports)."""
        index = self.index(kind)
        version = index.serving
        if version is None:
            return None
        blob = self.blob(kind, version, index)
        return (version, blob) if blob is not None else None
