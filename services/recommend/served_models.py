"""The rankers a recommend process serves: the registry's serving version, hot-reloaded when the registry
changes, and the versions experiment arms name (model vs model in one process).

Every replica follows the registry on its own (`follow`, on each cache refresh), so a publish or a pinned
rollback reaches all of them within a refresh interval, and survives restarts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from services.common.models import ModelIndex
from services.experiments.config import ArmChoice
from services.recommend.ranking.candidates import SOURCES
from services.recommend.ranking.fusion import CandidateFusion
from services.recommend.ranking.item_embeddings import ItemEmbeddings
from services.recommend.ranking.ranker import IncompatibleModel, RankerModel, verify_model_text
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings

log = logging.getLogger(__name__)

ARM_MODEL_MISSING = Counter(
    "selaras_arm_model_missing_total",
    "Requests of an experiment arm whose named ranker version is not loaded (served by the serving model)",
    ["experiment", "arm"],
)
MODEL_INFO = Gauge("selaras_model_loaded_timestamp_seconds", "When the serving model was trained", ["version"])


class ServedModels:
    def __init__(
        self,
        settings: RecommendSettings,
        repository: RecommendRepository,
        arm_versions: Callable[[], set[str]] = set,
    ):
        """`arm_versions`: the ranker versions experiment arms name now (asked on every refresh)."""
        self.settings = settings
        self.repository = repository
        self.arm_versions = arm_versions
        self.serving: RankerModel | None = None
        self.skipped: dict[str, str] = {}  # version -> why it does not load (readiness shows it)
        self.arm_models: dict[str, RankerModel] = {}  # ranker versions experiment arms name, by version
        self._lock = threading.Lock()
        self._generation = -1  # of the registry index the serving model was chosen from

    def reload(self, version: str | None = None) -> tuple[str | None, str | None]:
        """Load `version`, else what the model registry says serves (the pinned version, else the newest that
        loads: a damaged or incompatible newest falls back to the one before). The swap is atomic; in-flight
        requests finish on the old model. Returns (serving version, previous version)."""
        with self._lock:
            previous = self.serving.meta.version if self.serving else None
            index = self.repository.model_index()
            self._generation = index.generation
            for candidate in [version] if version else index.load_order():
                model = self._load(candidate, index)
                if model is None:
                    continue
                outgoing = self.serving
                self.serving = model
                if outgoing is not None and previous != candidate:
                    self._keep_for_arms(outgoing)
                if previous and previous != candidate:
                    MODEL_INFO.remove(previous)
                MODEL_INFO.labels(candidate).set(model.meta.created_at)
                return candidate, previous
            return previous, previous

    def follow(self) -> None:
        """Reload when the registry changed (a training published, an operator pinned): one small read. Runs
        on every cache refresh, so every replica and worker converges within `refresh_interval_s`."""
        if self.repository.model_index().generation != self._generation:
            self.reload()
        self.load_arm_models()

    def load_arm_models(self) -> None:
        """Load the ranker versions that experiment arms name, off the request path: a request never waits for
        a model to load. Versions no arm names any more are let go."""
        wanted = self.arm_versions()
        serving = self.serving.meta.version if self.serving else None
        index = None
        loaded: dict[str, RankerModel] = {}
        for version in sorted(wanted - {serving}):
            model = self.arm_models.get(version)
            if model is None:
                index = index or self.repository.model_index()
                with self._lock:
                    model = self._load(version, index)
            if model is not None:
                loaded[version] = model
        self.arm_models = loaded

    def of_arm(self, experiment: ArmChoice | None, serving: RankerModel | None) -> RankerModel | None:
        """The ranker of the visitor's arm: the version the arm names when it is loaded, else the serving one
        (counted: an arm naming a version that does not load serves the serving model)."""
        if experiment is None or experiment.model is None:
            return serving
        if serving is not None and serving.meta.version == experiment.model:
            return serving
        model = self.arm_models.get(experiment.model)
        if model is None:
            ARM_MODEL_MISSING.labels(experiment.key, experiment.arm).inc()
            return serving
        return model

    def _load(self, version: str, index: ModelIndex) -> RankerModel | None:
        """The version loaded, or None with the reason kept in `skipped`."""
        if self.serving is not None and self.serving.meta.version == version:
            return self.serving
        try:
            meta = self.repository.model_meta(version)
            text = self.repository.model_text(version, index)
            if meta is None or text is None:
                self.skipped[version] = "not found"
                return None
            verify_model_text(text)
            model = RankerModel.from_bytes(text, meta, self.settings.data_dir / "compiled-models")
            embeddings = self.repository.model_embeddings(version)
            model.embeddings = ItemEmbeddings.from_bytes(embeddings) if embeddings else None
            fusion = self.repository.model_fusion(version)
            model.fusion = CandidateFusion.from_bytes(fusion, SOURCES) if fusion else None
            return model
        except IncompatibleModel as exc:
            self.skipped[version] = str(exc)
            log.warning("skipping incompatible model: %s", exc)
        except Exception as exc:  # damaged (DamagedModel, CorruptModel) or unparsable
            self.skipped[version] = f"unreadable: {exc}"
            log.warning("skipping unreadable model %s: %s", version, exc)
        return None

    def _keep_for_arms(self, outgoing: RankerModel) -> None:
        """A model that stops serving but an experiment arm names (v1 after v2 is pinned) stays loaded as that
        arm's model, so the arm is never ranked by the new serving version while it waits for a reload."""
        if outgoing.meta.version in self.arm_versions():
            self.arm_models = {**self.arm_models, outgoing.meta.version: outgoing}
